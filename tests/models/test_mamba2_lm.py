"""The language model with Mamba-2 mixers (`layer="mamba2"`, the `mamba2-*` presets): greedy
generation against full forwards, packed prompts against each alone, the checkpoint formats
both ways (tests/checkpoint/test_mamba2_formats.py tests them in depth), and the presets'
official shapes."""

from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLM, create_model
from mambakit.modules import Mamba2


@pytest.fixture(scope="module")
def model() -> MambaLM:
    torch.manual_seed(0)
    return create_model("mamba2-tiny", n_layer=2, d_model=64).eval()


def test_every_layer_is_a_mamba2_mixer(model):
    assert all(isinstance(block.mixer, Mamba2) for block in model.backbone.layers)


@torch.no_grad()
def test_greedy_tokens_are_the_argmax_of_the_full_forward(model):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=9, temperature=0.0)
    assert torch.equal(model(out)[:, 9:-1].argmax(-1), out[:, 10:])


@torch.no_grad()
def test_packed_prompts_give_each_prompt_its_own_tokens(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (7, 1, 12)]
    together = model.generate(prompts, max_new_tokens=6, temperature=0.0)
    for prompt, got in zip(prompts, together):
        assert torch.equal(got, model.generate(prompt[None], max_new_tokens=6, temperature=0.0)[0])


@torch.no_grad()
def test_the_mambakit_format_round_trips(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("fmt", ["hf", "official"])
def test_the_hf_and_official_formats_round_trip(model, tmp_path, fmt):
    model.save_pretrained(tmp_path / fmt, format=fmt)
    loaded = MambaLM.from_pretrained(tmp_path / fmt)
    assert loaded.config.layer == "mamba2"
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("name,d_model,n_layer", [("mamba2-130m", 768, 24), ("mamba2-370m", 1024, 48),
                                                  ("mamba2-780m", 1536, 48), ("mamba2-1.3b", 2048, 48),
                                                  ("mamba2-2.7b", 2560, 64)])
def test_presets_have_the_official_shapes(name, d_model, n_layer):
    config = MambaConfig.from_name(name)
    assert (config.d_model, config.n_layer, config.layer) == (d_model, n_layer, "mamba2")
    assert (config.d_state, config.headdim, config.ngroups, config.expand) == (128, 64, 1, 2)
    mixer = create_model(name, n_layer=1, device="meta").backbone.layers[0].mixer
    # in_proj: z, x (d_inner each), B and C (d_state each), dt (one per head)
    assert mixer.in_proj.weight.shape == (2 * 2 * d_model + 2 * 128 + 2 * d_model // 64, d_model)


@pytest.mark.parametrize("overrides,name", [(dict(headdim=48), "headdim"), (dict(ngroups=3), "ngroups"),
                                            (dict(gate=False), "gate")])
def test_bad_mamba2_configs_name_the_field(overrides, name):
    with pytest.raises(ValueError, match=name):
        MambaConfig(**{"d_model": 64, "layer": "mamba2", "headdim": 32, **overrides})


def test_chunked_loss_carries_the_state_with_the_exact_gradient():
    """1M-token training runs chunk by chunk through the carried conv and SSD states: the loss
    and the gradients equal the whole sequence's (float64)."""
    torch.manual_seed(3)
    model = create_model("mamba2-tiny", n_layer=2, d_model=64).double()
    g = torch.Generator().manual_seed(4)
    ids, targets = torch.randint(0, 256, (2, 40), generator=g), torch.randint(0, 256, (2, 40), generator=g)
    whole = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    chunked = model.chunked_loss(ids, targets, chunk_len=16)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    params = [model.backbone.layers[0].mixer.A_log, model.backbone.layers[1].mixer.in_proj.weight]
    for a, b in zip(torch.autograd.grad(chunked, params), torch.autograd.grad(whole, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_half_precision_model_keeps_its_ssm_state_in_its_dtype(model):
    """As the official Mamba2 and transformers: a bf16 model's (H, P, N) states are bf16 (its
    decoding step is bound by reading and writing them), a fp32 model's fp32; a dtype given to
    allocate_cache wins. Decoding from the bf16 states stays with the full forward's logits."""
    assert {s.ssm.dtype for s in model.allocate_cache(2).layers} == {torch.float32}
    half = create_model("mamba2-tiny", n_layer=2).to(torch.bfloat16).eval()
    assert {(s.conv.dtype, s.ssm.dtype) for s in half.allocate_cache(2).layers} == {(torch.bfloat16, torch.bfloat16)}
    assert {s.ssm.dtype for s in half.allocate_cache(2, dtype=torch.float32).layers} == {torch.float32}
    ids = torch.randint(0, half.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = half(ids).float()  # (2, 24, V)
        _, cache = half.prefill(ids[:, :16])
        assert {s.ssm.dtype for s in cache.layers} == {torch.bfloat16}
        stepped = torch.stack([half.step(ids[:, t], cache).float() for t in range(16, 24)], dim=1)
    scale = full.abs().max().item()
    torch.testing.assert_close(stepped, full[:, 16:], rtol=0, atol=0.03 * scale)
