"""The torch causal conv1d and the in-place decode steps against the reference."""

import pytest
import torch

from mambakit import ops
from mambakit.ops import causal_conv1d_ref, causal_conv1d_update_ref, selective_state_update_ref
from tests.scan_inputs import make_scan_inputs


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 3, 17])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_matches_reference_with_gradients(width, length, with_state):
    g = torch.Generator().manual_seed(width * 100 + length)
    x = torch.randn(2, 6, length, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, width, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(2, 6, width - 1, dtype=torch.float64, generator=g, requires_grad=True) if with_state else None
    y_ref, f_ref = causal_conv1d_ref(x, w, b, "silu", initial_state=s, return_final_state=True)
    y, f = ops.causal_conv1d(x, w, b, "silu", initial_state=s, return_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(f, f_ref)
    inputs = [t for t in (x, w, b, s) if t is not None]
    gy = torch.randn_like(y)
    g_ref = torch.autograd.grad((y_ref * gy).sum() + f_ref.sum(), inputs)
    g_got = torch.autograd.grad((y * gy).sum() + f.sum(), inputs)
    for a, e in zip(g_got, g_ref):
        torch.testing.assert_close(a, e)


def test_conv_reads_transposed_input():
    base = torch.randn(2, 9, 8)  # (B, L, D) memory, seen as (B, D, L)
    x = base.transpose(1, 2)
    w = torch.randn(8, 4)
    torch.testing.assert_close(ops.causal_conv1d(x, w, activation="silu"),
                               causal_conv1d_ref(x.contiguous(), w, activation="silu"))


@pytest.mark.parametrize("groups", [None, 2])
def test_state_update_in_place_matches_reference(groups):
    kw = make_scan_inputs(3, 4, 1, 5, groups=groups)
    state = torch.randn(3, 4, 5)
    args = dict(x=kw["u"][..., 0], dt=kw["delta"][..., 0], A=kw["A"], B=kw["B"][..., 0], C=kw["C"][..., 0],
                D=kw["D"], z=kw["z"][..., 0], dt_bias=kw["delta_bias"], dt_softplus=True)
    y_ref, new_ref = selective_state_update_ref(state.clone(), **args)
    for backend in ("torch", "reference"):
        s = state.clone()
        y = ops.selective_state_update(s, **args, backend=backend)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, new_ref, rtol=1e-5, atol=1e-6)


def test_conv_update_in_place_matches_reference():
    x, conv_state, w, b = torch.randn(2, 6), torch.randn(2, 6, 3), torch.randn(6, 4), torch.randn(6)
    y_ref, new_ref = causal_conv1d_update_ref(x, conv_state.clone(), w, b, "silu")
    s = conv_state.clone()
    y = ops.causal_conv1d_update(x, s, w, b, "silu")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, new_ref)
