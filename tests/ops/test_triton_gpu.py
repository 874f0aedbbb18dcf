"""The Triton scan on the device: bf16 against the fp32 reference with the official
tolerances, the longest shape of the benchmark, and B*D*L beyond 2^31 elements."""

import pytest
import torch

from mambakit.ops import selective_scan, selective_scan_chunked, selective_scan_ref
from tests.scan_inputs import make_scan_inputs

pytestmark = pytest.mark.gpu
BF16 = dict(rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("groups", [None, 2])
def test_bf16_matches_fp32_reference(groups):
    kw = make_scan_inputs(2, 64, 500, 16, groups=groups, with_init=True)
    bf = {k: (v.cuda().to(torch.bfloat16) if k not in ("A", "D", "delta_bias", "initial_state") else v.cuda())
          for k, v in kw.items()}
    # the fp32 reference on the same (bf16-rounded) inputs, as the official tests compare
    y_ref, h_ref = selective_scan_ref(**{k: v.float().cpu() for k, v in bf.items()}, delta_softplus=True,
                                      return_final_state=True)
    y, h = selective_scan(**bf, delta_softplus=True, return_final_state=True, backend="triton")
    torch.testing.assert_close(y.float().cpu(), y_ref, **BF16)
    torch.testing.assert_close(h.cpu(), h_ref, **BF16)


@pytest.mark.parametrize("batch", [8, 16])
def test_bf16_gradients_match_fp32_reference_at_both_backward_block_sizes(batch):
    """D = 1536, as in the benchmark: 12288 (sequence, channel) rows run the lanes backward with
    4 channels per program, 24576 rows with 8 (`lanes_bwd_shape`). Every gradient of the bf16
    kernel against the fp32 reference on the same bf16-rounded inputs."""
    from mambakit.ops.triton.scan_plan import plan_scan
    kw = make_scan_inputs(batch, 1536, 48, 16, with_init=True)
    keep_fp32 = ("A", "D", "delta_bias", "initial_state")
    bf = {k: (v.cuda() if k in keep_fp32 else v.cuda().to(torch.bfloat16)).requires_grad_() for k, v in kw.items()}
    ref = {k: v.detach().float().requires_grad_() for k, v in bf.items()}
    assert plan_scan(bf["u"], bf["B"], bf["A"], None).backward.meta["BLOCK_D"] == (4 if batch == 8 else 8)
    g = torch.Generator(device="cuda").manual_seed(1)
    gy = torch.randn(batch, 1536, 48, generator=g, device="cuda")
    gh = torch.randn(batch, 1536, 16, generator=g, device="cuda")
    for inputs, fn in ((bf, lambda **a: selective_scan(**a, backend="triton")), (ref, selective_scan_ref)):
        y, h = fn(**inputs, delta_softplus=True, return_final_state=True)
        ((y.float() * gy).sum() + (h.float() * gh).sum()).backward()
    for name in bf:
        # sums over 48 steps or 1536 channels: the tolerances scale with the gradient's size
        scale = ref[name].grad.abs().max().item()
        torch.testing.assert_close(bf[name].grad.float(), ref[name].grad, rtol=3e-2, atol=5e-2 * max(1.0, scale / 10),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_length_131072_matches_chunked_torch_scan():
    kw = make_scan_inputs(1, 16, 131072, 16, with_init=True)
    cuda = {k: v.cuda() for k, v in kw.items()}
    y_ref, h_ref = selective_scan_chunked(**cuda, delta_softplus=True, return_final_state=True)
    y, h = selective_scan(**cuda, delta_softplus=True, return_final_state=True, backend="triton")
    torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(h, h_ref, rtol=6e-4, atol=2e-3)


def test_more_than_2_31_elements_uses_64_bit_offsets():
    batch, dim, length = 40, 2048, 32768  # B*D*L = 2.7e9 > 2^31
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16, generator=g)
    A = -torch.rand(dim, 4, device="cuda", generator=g) - 0.5
    B = torch.randn(batch, 4, length, device="cuda", dtype=torch.bfloat16, generator=g)
    C = torch.randn(batch, 4, length, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        y = selective_scan(u, delta, A, B, C, delta_softplus=True, backend="triton")
        # the last batch's last channels sit past 2^31 elements; channels are independent
        tail = slice(dim - 3, dim)
        expect = selective_scan_chunked(u[-1:, tail].float(), delta[-1:, tail].float(), A[tail], B[-1:].float(),
                                        C[-1:].float(), delta_softplus=True)
    assert u.numel() > 2**31
    torch.testing.assert_close(y[-1:, tail].float(), expect, **BF16)


def test_time_major_inputs_past_2_31_time_offsets_match_channels_first():
    """Time-major views, (1, L, D) read as (1, D, L), whose time offsets t * D pass 2^31: the
    launchers copy them channels-first (ops/triton/selective_scan._time_safe) rather than let
    the lanes kernels' 32-bit time offsets wrap."""
    dim, length = 2560, 2**20  # (L - 1) * D = 2.7e9 > 2^31; about 40 GB in all
    assert (length - 1) * dim >= 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    u, delta, z = (torch.randn(1, length, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for _ in range(3))
    A = -torch.rand(dim, 4, device="cuda", generator=g) - 0.5
    B = torch.randn(1, 4, length, device="cuda", dtype=torch.bfloat16, generator=g)
    C = torch.randn(1, 4, length, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.no_grad():
        y = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, backend="triton")
        y_ref = selective_scan(u.contiguous(), delta.contiguous(), A, B, C, z=z.contiguous(), delta_softplus=True,
                               backend="triton")
    assert u.stride(-1) == dim
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_torch_compile_fullgraph_mamba_block_matches_eager():
    from mambakit import Mamba
    torch.manual_seed(0)
    mixer = Mamba(64, d_state=16).cuda()
    x = torch.randn(2, 128, 64, device="cuda", requires_grad=True)
    eager = mixer(x)
    eager.sum().backward()
    g_eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(mixer, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, g_eager, rtol=1e-4, atol=1e-4)
