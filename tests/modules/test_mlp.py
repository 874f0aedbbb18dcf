"""The MLPs of hybrid blocks: the official GatedMLP's layout (fc1 = [y; gate], y · SiLU(gate)
through fc2), Jamba's mixture of experts against a per-token reference (softmax routing, the
top-k's probabilities not renormalised, tokens that no expert gets), its sync-free path equal to
its loop, and Jamba's x_proj with dt, B and C normalised, inside a Mamba mixer on every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.modules import GatedMLP, Mamba, MixtureOfExperts, NormedXProj

D_MODEL, HIDDEN = 16, 24


def tokens(n=11, seed=0):
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gated_mlp_is_the_official_layout():
    torch.manual_seed(0)
    mlp = GatedMLP(D_MODEL, HIDDEN).double()
    assert mlp.fc1.weight.shape == (2 * HIDDEN, D_MODEL) and mlp.fc2.weight.shape == (D_MODEL, HIDDEN)
    assert mlp.fc1.bias is None and mlp.fc2.bias is None  # the official GatedMLP's default
    x = tokens().reshape(1, 11, D_MODEL)
    y, gate = mlp.fc1.weight[:HIDDEN], mlp.fc1.weight[HIDDEN:]  # the first half is y, the second the gate
    expected = ((x @ y.T) * F.silu(x @ gate.T)) @ mlp.fc2.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


def reference_moe(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: its top_k experts by softmax probability, each output weighted by
    that probability."""
    out = torch.zeros_like(x)
    for n, token in enumerate(x):
        probs = torch.softmax(moe.router.weight @ token, -1)
        for e in torch.topk(probs, moe.top_k).indices.tolist():
            out[n] += probs[e] * moe.experts[e](token)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_mixture_of_experts_equals_the_per_token_reference(top_k):
    torch.manual_seed(top_k)
    moe = MixtureOfExperts(D_MODEL, HIDDEN, num_experts=4, top_k=top_k).double()
    x = tokens(seed=top_k)
    torch.testing.assert_close(moe(x), reference_moe(moe, x), rtol=1e-12, atol=1e-12)
    # (..., d_model) in, the same shape out
    assert moe(x.reshape(1, 11, D_MODEL)).shape == (1, 11, D_MODEL)
    weights, chosen = moe.route(x)
    torch.testing.assert_close(moe.dense(x, weights, chosen), moe(x), rtol=1e-12, atol=1e-12)


def test_an_expert_that_no_token_chooses_is_skipped_and_adds_nothing():
    torch.manual_seed(0)
    moe = MixtureOfExperts(D_MODEL, HIDDEN, num_experts=3, top_k=1).double()
    with torch.no_grad():
        moe.router.weight[2] = -1e3  # on tokens of positive entries, expert 2 never wins
    x = tokens().abs()
    calls = []
    moe.experts[2].register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(moe(x), reference_moe(moe, x), rtol=1e-12, atol=1e-12)
    assert calls == []


def test_top_k_above_the_experts_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        MixtureOfExperts(D_MODEL, HIDDEN, num_experts=2, top_k=3)


def test_normed_x_proj_normalises_dt_b_and_c_and_runs_on_every_mamba_path():
    torch.manual_seed(0)
    mixer = Mamba(D_MODEL, d_state=4, dt_rank=3).double()
    mixer.x_proj = NormedXProj(mixer.d_inner, 3, 4, eps=1e-6).double()
    with torch.no_grad():
        for p in mixer.x_proj.parameters():
            p.add_(0.3 * torch.randn_like(p))
    inner = torch.randn(5, mixer.d_inner, dtype=torch.float64)
    raw = inner @ mixer.x_proj.weight.T
    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    expected = torch.cat([rms(raw[:, :3], mixer.x_proj.dt_norm.weight), rms(raw[:, 3:7], mixer.x_proj.b_norm.weight),
                          rms(raw[:, 7:], mixer.x_proj.c_norm.weight)], -1)
    torch.testing.assert_close(mixer.x_proj(inner), expected, rtol=1e-12, atol=1e-12)
    # the mixer calls it (its weight is not read by a fused path): a step equals the forward
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    full = mixer(x)
    state = mixer.allocate_state(2)
    stepped = torch.stack([mixer.step(x[:, t], state) for t in range(7)], 1)
    torch.testing.assert_close(stepped, full, rtol=1e-6, atol=1e-6)  # (as the plain mixer's step: 1e-8 apart)
    plain = Mamba(D_MODEL, d_state=4, dt_rank=3).double()
    plain.load_state_dict({k: v for k, v in mixer.state_dict().items() if "_norm" not in k})
    assert not torch.allclose(plain(x), full)  # the norms change the output
