"""The sequential spec against an implementation nobody here wrote (transformers' torch
fallback of selective_scan_fn), and the structural properties the spec must have."""

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import (causal_conv1d_ref, causal_conv1d_update_ref, selective_scan_ref,
                          selective_state_update_ref)
from tests.scan_inputs import make_scan_inputs

modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")


def _hf_scan(**kw):
    fn = getattr(modeling_mamba.mamba_selective_scan, "__wrapped__", modeling_mamba.mamba_selective_scan)
    return fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], D=kw["D"], z=kw["z"], delta_bias=kw["delta_bias"],
              delta_softplus=True, return_last_state=True)


@pytest.mark.parametrize("length", [1, 7, 33])
def test_reference_matches_transformers_fallback(length):
    # fp32: the fallback casts B and u to fp32 internally
    kw = make_scan_inputs(2, 6, length, 5, dtype=torch.float32)
    y, last = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True)
    y_hf, last_hf = _hf_scan(**kw)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_hf, rtol=1e-5, atol=1e-5)


def test_reference_state_chaining_equals_one_pass():
    kw = make_scan_inputs(2, 4, 20, 3, groups=2, dtype=torch.float64)
    y, final = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True)
    cut = 9
    first = {k: (v[..., :cut] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    second = {k: (v[..., cut:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    y1, h1 = selective_scan_ref(**first, delta_softplus=True, return_final_state=True)
    second["initial_state"] = h1
    y2, h2 = selective_scan_ref(**second, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y)
    torch.testing.assert_close(h2, final)


def test_reference_groups_equal_expanded_channels():
    kw = make_scan_inputs(1, 6, 9, 4, groups=3, dtype=torch.float64)
    y = selective_scan_ref(**kw)
    expanded = dict(kw)
    for name in ("B", "C"):
        expanded[name] = kw[name].repeat_interleave(2, dim=1)  # (1, 6, N, L): one group per channel
    y_exp = selective_scan_ref(**expanded)
    torch.testing.assert_close(y, y_exp)


def test_reference_varlen_equals_separate_sequences():
    lengths = [3, 1, 6]
    kw = make_scan_inputs(1, 4, sum(lengths), 3, dtype=torch.float64, with_init=True, n_seqs=3)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    y, final = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: (v[..., a:b] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        part["initial_state"] = kw["initial_state"][s:s + 1]
        ys, fs = selective_scan_ref(**part, delta_softplus=True, return_final_state=True)
        torch.testing.assert_close(y[..., a:b], ys)
        torch.testing.assert_close(final[s:s + 1], fs)


def test_reference_dtypes():
    kw16 = make_scan_inputs(1, 4, 5, 3, dtype=torch.bfloat16)
    y, h = selective_scan_ref(**kw16, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    kw64 = make_scan_inputs(1, 4, 5, 3, dtype=torch.float64)
    y, h = selective_scan_ref(**kw64, return_final_state=True)
    assert y.dtype == torch.float64 and h.dtype == torch.float64


def test_conv_ref_matches_torch_conv1d_and_chains():
    x, w, b = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = causal_conv1d_ref(x, w, b, "silu")
    expect = F.silu(F.conv1d(F.pad(x, (3, 0)), w[:, None], b, groups=5))
    torch.testing.assert_close(y, expect)
    y1, s1 = causal_conv1d_ref(x[..., :6], w, b, "silu", return_final_state=True)
    y2 = causal_conv1d_ref(x[..., 6:], w, b, "silu", initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y)


def test_single_step_updates_continue_the_scan():
    kw = make_scan_inputs(2, 6, 8, 4, groups=2, dtype=torch.float64)
    y, h = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    for t in range(8):
        y_t, state = selective_state_update_ref(state, kw["u"][..., t], kw["delta"][..., t], kw["A"], kw["B"][..., t],
                                                kw["C"][..., t], D=kw["D"], z=kw["z"][..., t],
                                                dt_bias=kw["delta_bias"], dt_softplus=True)
        torch.testing.assert_close(y_t, y[..., t])
    torch.testing.assert_close(state, h)

    x, w = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = causal_conv1d_ref(x, w, None, "silu")
    conv_state = torch.zeros(2, 5, 3, dtype=torch.float64)
    for t in range(7):
        y_t, conv_state = causal_conv1d_update_ref(x[..., t], conv_state, w, None, "silu")
        torch.testing.assert_close(y_t, y[..., t])
