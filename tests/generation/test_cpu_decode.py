"""The planned CPU decoder (cpu_decode.py) against the readable path, MambaLM.step: the same
logits at every step, the same cache afterwards, and a rebuild when a parameter changes."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.generation.cpu_decode import CpuDecoder, cpu_decoder


def make_model(**overrides):
    torch.manual_seed(0)
    config = dict(d_model=32, n_layer=3, vocab_size=61, d_state=8)
    config.update(overrides)
    model = MambaLM(MambaConfig(**config)).eval()
    with torch.no_grad():  # random biases and norm weights, so that every term is exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def greedy_by_steps(model, prompt, n):
    """The readable path: prefill, then n greedy tokens through MambaLM.step."""
    logits, cache = model.prefill(prompt)
    tokens = [prompt]
    for _ in range(n):
        token = logits[:, :61].argmax(-1)
        tokens.append(token[:, None])
        logits = model.step(token, cache)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("overrides", [
    {},
    {"bias": True, "rms_norm": False},  # in/out_proj biases, LayerNorm
    {"d_conv": 2, "conv_bias": False},
    {"d_conv": 5, "tie_embeddings": False},
])
@torch.no_grad()
def test_planned_steps_equal_model_step(overrides):
    model = make_model(**overrides)
    prompt = torch.randint(0, 61, (3, 7))
    _, ref_cache = model.prefill(prompt)
    _, cache = model.prefill(prompt)
    plan = CpuDecoder(model, 3)
    plan.load(cache)
    tokens = torch.randint(0, 61, (12, 3))
    for step, token in enumerate(tokens):  # more steps than the ring has slots, so it wraps
        expected = model.step(token, ref_cache)
        got = plan(token)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    plan.store(cache)
    for mine, ref in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(mine.conv, ref.conv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.ssm, ref.ssm, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_generate_uses_the_plan_and_matches_the_step_loop(monkeypatch):
    model = make_model()
    prompt = torch.randint(0, 61, (2, 5))
    calls = []
    planned_step = CpuDecoder.__call__
    monkeypatch.setattr(CpuDecoder, "__call__", lambda self, token: calls.append(1) or planned_step(self, token))
    out = model.generate(prompt, max_new_tokens=10)
    assert len(calls) == 9  # every step after the prefill's logits went through the plan
    monkeypatch.undo()
    assert torch.equal(out, greedy_by_steps(model, prompt, 10))


def test_generation_after_a_fused_optimizer_step_uses_the_new_weights():
    """torch's fused AdamW updates parameters without bumping their version counters, so
    nothing derived from the parameters (A, the conv taps) may be kept across generations
    keyed on versions. After a training step, generation must match model.step on the new weights."""
    model = make_model()
    prompt = torch.randint(0, 61, (2, 5))
    before = model.generate(prompt, max_new_tokens=6)  # a first generation, as a cache would be primed
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    versions = [p._version for p in model.parameters()]
    model(prompt).float().square().mean().backward()
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions  # the premise: no version moved
    after = model.generate(prompt, max_new_tokens=6)
    assert torch.equal(after, greedy_by_steps(model, prompt, 6)) and not torch.equal(after, before)


def test_plan_does_not_apply_where_it_cannot():
    with torch.no_grad():
        assert cpu_decoder(make_model(layer="s4d"), 1) is None  # S4D mixers decode through step()
        assert cpu_decoder(make_model().double(), 1) is None  # fp64 models stay on the exact path
    assert cpu_decoder(make_model(), 1) is None  # gradients on: never in-place buffers
