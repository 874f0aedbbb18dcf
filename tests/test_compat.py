"""mambakit.compat: the official entry points' signatures and return conventions, checked
against the reference; and transformers' Mamba patched onto mambakit's kernels, checked
against the unpatched model."""

import pytest
import torch

import mambakit.ops
from mambakit import compat
from mambakit.ops import causal_conv1d_ref, selective_scan_ref, selective_state_update_ref
from tests.scan_inputs import make_scan_inputs

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("return_last_state", [False, True])
def test_selective_scan_fn(groups, return_last_state):
    kw = make_scan_inputs(2, 4, 17, 5, groups=groups)
    kw.pop("initial_state")
    got = compat.selective_scan_fn(**kw, delta_softplus=True, return_last_state=return_last_state)
    ref = selective_scan_ref(**kw, delta_softplus=True, return_final_state=return_last_state)
    if return_last_state:
        assert isinstance(got, tuple) and len(got) == 2
        torch.testing.assert_close(got[0], ref[0], **TOL)
        torch.testing.assert_close(got[1], ref[1], **TOL)
    else:
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, ref, **TOL)
    with pytest.raises(ValueError, match="non-selective B"):
        compat.selective_scan_fn(kw["u"], kw["delta"], kw["A"], torch.randn(4, 5), kw["C"])


@pytest.mark.parametrize("activation", [None, "silu", True])
def test_causal_conv1d_fn(activation):
    x, w, b = torch.randn(2, 6, 11), torch.randn(6, 4), torch.randn(6)
    init = torch.randn(2, 6, 3)
    act = None if activation is None else "silu"
    ref_y, ref_f = causal_conv1d_ref(x, w, b, act, initial_state=init, return_final_state=True)
    torch.testing.assert_close(compat.causal_conv1d_fn(x, w, b, activation=activation, initial_states=init), ref_y,
                               **TOL)
    y, f = compat.causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation=activation)
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(f, ref_f, **TOL)
    out = torch.empty(2, 6, 3)
    y = compat.causal_conv1d_fn(x, w, b, initial_states=init, final_states_out=out, activation=activation)
    torch.testing.assert_close(out, ref_f, **TOL)
    with pytest.raises(ValueError, match="seq_idx"):  # as officially: packed sequences carry no states
        compat.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 11, dtype=torch.int32), initial_states=init)


@pytest.mark.parametrize("state_len", [3, 4, 6])
@pytest.mark.parametrize("seqlen", [None, 1, 3])
def test_causal_conv1d_update_continues_the_conv(state_len, seqlen):
    x, w, b = torch.randn(2, 5, 9), torch.randn(5, 4), torch.randn(5)
    full = causal_conv1d_ref(x, w, b, "silu")
    state = torch.zeros(2, 5, state_len)
    step = 1 if seqlen is None else seqlen
    outs = []
    for t in range(0, 9, step):
        chunk = x[:, :, t:t + step]
        out = compat.causal_conv1d_update(chunk[..., 0] if seqlen is None else chunk, state, w, b, "silu")
        outs.append(out[..., None] if seqlen is None else out)
    torch.testing.assert_close(torch.cat(outs, -1), full, **TOL)
    torch.testing.assert_close(state, torch.cat([torch.zeros(2, 5, state_len), x], -1)[..., -state_len:])


def test_selective_state_update():
    kw = make_scan_inputs(2, 4, 1, 3)
    state = torch.randn(2, 4, 3)
    args = (kw["u"][..., 0], kw["delta"][..., 0], kw["A"], kw["B"][..., 0], kw["C"][..., 0])
    y_ref, new_ref = selective_state_update_ref(state, *args, D=kw["D"], z=kw["z"][..., 0],
                                                dt_bias=kw["delta_bias"], dt_softplus=True)
    s = state.clone()
    y = compat.selective_state_update(s, *args, D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"],
                                      dt_softplus=True)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(s, new_ref, **TOL)


def test_patched_transformers_equals_unpatched(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4)
    model = transformers.MambaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    calls = {"scan": 0, "step": 0}
    real_scan, real_step = mambakit.ops.selective_scan, mambakit.ops.selective_state_update

    def counting_scan(*a, **k):
        calls["scan"] += 1
        return real_scan(*a, **k)

    def counting_step(*a, **k):
        calls["step"] += 1
        return real_step(*a, **k)
    monkeypatch.setattr(mambakit.ops, "selective_scan", counting_scan)
    monkeypatch.setattr(mambakit.ops, "selective_state_update", counting_step)
    replaced = compat.patch_transformers()
    try:
        assert "mamba.mamba_selective_scan" in replaced
        with torch.no_grad():
            patched_logits = model(ids).logits
            patched_greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        compat.unpatch_transformers()
    assert calls["scan"] > 0 and calls["step"] > 0  # mambakit's kernels really ran
    torch.testing.assert_close(patched_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(patched_greedy, greedy)
