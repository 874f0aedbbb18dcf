"""The attention layer on the GPU: SDPA's flash kernel takes its heads (the math kernel's memory
grows with the square of the length), with the fused conv and without."""

from __future__ import annotations

import pytest
import torch

from mambakit.modules import Attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("d_conv", [0, 4])
@pytest.mark.parametrize("rotary", [0, 32])
def test_training_and_decoding_run_on_the_flash_kernel_alone(d_conv, rotary):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    module = Attention(768, num_heads=12, head_dim=64, d_conv=d_conv, rotary_emb_dim=rotary,
                       device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises where flash cannot take the inputs
        out = module(x)
        out.float().square().mean().backward()
    reference = Attention(768, num_heads=12, head_dim=64, d_conv=d_conv, rotary_emb_dim=rotary,
                          device="cuda", dtype=torch.float32)
    reference.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    with sdpa_kernel([SDPBackend.MATH]):
        expected = reference(x.detach().float())
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
