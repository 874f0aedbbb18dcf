"""The planned CPU decoder for Mamba-2 blocks (cpu_decode_mamba2.py) against the readable path,
MambaLM.step: the same logits at every step and the same cache afterwards; prefill then planned
steps equal one forward over the whole sequence; generate goes through the plan and gives the
greedy tokens of the step loop; a wrapped submodule falls back to model.step."""

import pytest
import torch

from mambakit.generation.cpu_decode import CpuDecoder, cpu_decoder, supports_cpu_decoder
from tests.generation.test_cpu_decode import make_model as mamba1_model

VOCAB = 61


def make_model(**overrides):
    """The Mamba-1 tests' model (random biases and norm weights) with Mamba-2 mixers."""
    return mamba1_model(**{"n_layer": 2, "vocab_size": VOCAB, "layer": "mamba2", "headdim": 8, **overrides})


@pytest.mark.parametrize("overrides", [
    {},
    {"ngroups": 2, "bias": True, "rms_norm": False},  # B/C groups, in/out_proj biases, LayerNorm
    {"d_conv": 2, "conv_bias": False, "tie_embeddings": False},
    {"d_conv": 5, "headdim": 16},
])
@torch.no_grad()
def test_planned_steps_equal_model_step(overrides):
    model = make_model(**overrides)
    assert supports_cpu_decoder(model)
    prompt = torch.randint(0, VOCAB, (3, 7))
    _, ref_cache = model.prefill(prompt)
    _, cache = model.prefill(prompt)
    plan = CpuDecoder(model, 3)
    plan.load(cache)
    for step, token in enumerate(torch.randint(0, VOCAB, (12, 3))):  # more steps than the ring has slots
        expected = model.step(token, ref_cache)
        torch.testing.assert_close(plan(token), expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    plan.store(cache)
    for mine, ref in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(mine.conv, ref.conv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.ssm, ref.ssm, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_dt_limit_is_applied():
    model = make_model()
    for block in model.backbone.layers:
        block.mixer.dt_limit = (0.05, 0.2)
        block.mixer.dt_bias.fill_(3.0)  # softplus(3) ~ 3: clamped to 0.2
    prompt = torch.randint(0, VOCAB, (2, 5))
    _, ref_cache = model.prefill(prompt)
    _, cache = model.prefill(prompt)
    plan = CpuDecoder(model, 2)
    plan.load(cache)
    for token in torch.randint(0, VOCAB, (4, 2)):
        torch.testing.assert_close(plan(token), model.step(token, ref_cache), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prefill_then_planned_steps_equal_one_forward():
    model = make_model(ngroups=2)
    ids = torch.randint(0, VOCAB, (2, 19))
    whole = model(ids)  # (2, 19, V)
    logits, cache = model.prefill(ids[:, :9])
    torch.testing.assert_close(logits, whole[:, 8], rtol=1e-5, atol=1e-5)
    plan = CpuDecoder(model, 2)
    plan.load(cache)
    for t in range(9, 19):
        torch.testing.assert_close(plan(ids[:, t]), whole[:, t], rtol=1e-4, atol=1e-4, msg=f"position {t}")


@torch.no_grad()
def greedy_by_steps(model, prompt, n):
    """The readable path: prefill, then n greedy tokens through MambaLM.step."""
    logits, cache = model.prefill(prompt)
    tokens = [prompt]
    for _ in range(n):
        token = logits[:, :VOCAB].argmax(-1)
        tokens.append(token[:, None])
        logits = model.step(token, cache)
    return torch.cat(tokens, 1)


@torch.no_grad()
def test_generate_uses_the_plan_and_matches_the_step_loop(monkeypatch):
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 5))
    calls = []
    planned_step = CpuDecoder.__call__
    monkeypatch.setattr(CpuDecoder, "__call__", lambda self, token: calls.append(1) or planned_step(self, token))
    out = model.generate(prompt, max_new_tokens=10)
    assert len(calls) == 9  # every step after the prefill's logits went through the plan
    monkeypatch.undo()
    assert torch.equal(out, greedy_by_steps(model, prompt, 10))


@torch.no_grad()
def test_a_wrapped_submodule_decodes_through_model_step():
    """A hook on in_proj must run at every step: the plan, which reads the weights, stands aside."""
    model = make_model()
    seen = []
    model.backbone.layers[1].mixer.in_proj.register_forward_hook(lambda *_: seen.append(1))
    assert not supports_cpu_decoder(model) and cpu_decoder(model, 1) is None
    model.generate(torch.randint(0, VOCAB, (1, 4)), max_new_tokens=3)
    assert len(seen) == 1 + 2  # the prefill, then each step


def test_no_plan_for_a_norm_before_the_gate():
    """The plan gates then normalizes (the official layout); a norm before the gate steps through model.step."""
    model = make_model()
    model.backbone.layers[0].mixer.norm.norm_before_gate = True
    with torch.no_grad():
        assert not supports_cpu_decoder(model) and cpu_decoder(model, 1) is None


@pytest.mark.parametrize("layer", ["mamba", "mamba2"])
@torch.no_grad()
def test_a_hybrid_block_with_an_mlp_decodes_through_model_step(layer):
    """The plan steps the mixer only: a block with an MLP after its mixer (d_intermediate > 0)
    must not be planned, or every step would leave the MLP out."""
    model = make_model(layer=layer, d_intermediate=24, **({} if layer == "mamba2" else {"headdim": 64}))
    assert not supports_cpu_decoder(model) and cpu_decoder(model, 1) is None
    prompt = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(model.generate(prompt, max_new_tokens=6), greedy_by_steps(model, prompt, 6))
