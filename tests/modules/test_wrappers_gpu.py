"""Wrapped submodules on the GPU: peft's LoRA on the 130m model with the fused Triton kernels
(LoRA on in_proj / out_proj leaves the fused conv + x_proj + scan op in place), and torchao's
weight-only int8 / int4 quantization, whose tensor-subclass weights the mixers must call
through rather than read."""

from __future__ import annotations

import copy

import pytest
import torch

from mambakit import MambaLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model_130m(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM.from_name("130m").cuda()


def _batch(vocab: int, batch: int = 4, length: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), device="cuda", generator=g)


def test_lora_on_the_130m_model_trains_with_the_fused_kernels_and_merges_exactly():
    peft = pytest.importorskip("peft")
    model = _model_130m()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["in_proj", "out_proj"], lora_dropout=0.0)
    adapted = peft.get_peft_model(model, config)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    ids = _batch(model.config.vocab_size)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = adapted(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    adapted.eval()
    with torch.no_grad():
        before = adapted(ids).float()
        merged = adapted.merge_and_unload()
        after = merged(ids).float()
    torch.testing.assert_close(after, before, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_weight_only_quantization_runs_and_stays_close(bits):
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    model = _model_130m().to(torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    if bits == 8:
        config = torchao.quantization.Int8WeightOnlyConfig()
    else:
        config = torchao.quantization.Int4WeightOnlyConfig(group_size=64)
    try:
        quantize_(model, config)
    except ImportError as err:  # torchao's int4 layout needs a separate kernel package (mslk) on some builds
        pytest.skip(f"torchao int{bits} weight-only needs a kernel package that is not installed: {err}")
    ids = _batch(model.config.vocab_size, batch=2, length=64)
    with torch.no_grad():
        want = reference(ids).float()
        got = model(ids).float()
        out = model.generate(ids[:, :16], max_new_tokens=8, temperature=0.0)
    assert torch.isfinite(got).all()
    relative = (got - want).norm() / want.norm()
    assert relative < (0.05 if bits == 8 else 0.25), float(relative)
    assert out.shape == (2, 24) and int(out.max()) < model.config.vocab_size
