"""The Triton causal conv1d against the reference: outputs, final states and every gradient,
with and without an initial state, packed sequences, widths 1-4 and odd lengths. On a machine
without CUDA it runs under TRITON_INTERPRET=1 (conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")

from mambakit.ops import causal_conv1d, causal_conv1d_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-5)


def _grads(fn, tensors, cu_seqlens=None, **opts):
    leaves = {k: v.detach().clone().to(DEVICE).requires_grad_() for k, v in tensors.items() if v is not None}
    y, final = fn(leaves["x"], leaves["weight"], leaves.get("bias"), initial_state=leaves.get("initial_state"),
                  return_final_state=True, cu_seqlens=cu_seqlens, **opts)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g).to(DEVICE)
    gf = torch.randn(final.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), list(leaves.values()))
    return y.detach(), final.detach(), dict(zip(leaves, grads))


def _triton(*args, **kw):
    return causal_conv1d(*args, **kw, backend="triton")


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 3, 37])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference(width, length, with_state, activation):
    g = torch.Generator().manual_seed(width * 100 + length)
    tensors = dict(x=torch.randn(2, 20, length, generator=g), weight=torch.randn(20, width, generator=g),
                   bias=torch.randn(20, generator=g),
                   initial_state=torch.randn(2, 20, width - 1, generator=g) if with_state else None)
    y_ref, f_ref, g_ref = _grads(causal_conv1d_ref, tensors, activation=activation)
    y, f, grads = _grads(_triton, tensors, activation=activation)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(f, f_ref, **TOL)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], **TOL, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("lengths", [[3, 1, 6], [2, 9], [17]])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_match_reference(lengths, with_state):
    g = torch.Generator().manual_seed(len(lengths))
    L = sum(lengths)
    tensors = dict(x=torch.randn(1, 18, L, generator=g), weight=torch.randn(18, 4, generator=g), bias=None,
                   initial_state=torch.randn(len(lengths), 18, 3, generator=g) if with_state else None)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    y_ref, f_ref, g_ref = _grads(causal_conv1d_ref, tensors, cu_seqlens=cu, activation="silu")
    y, f, grads = _grads(_triton, tensors, cu_seqlens=cu, activation="silu")
    assert f.shape == (len(lengths), 18, 3)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(f, f_ref, **TOL)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_reference_packed_equals_separate_calls():
    x, w = torch.randn(1, 5, 10, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    init = torch.randn(2, 5, 2, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    y, f = causal_conv1d_ref(x, w, None, "silu", initial_state=init, return_final_state=True, cu_seqlens=cu)
    for s, (a, b) in enumerate(((0, 4), (4, 10))):
        ys, fs = causal_conv1d_ref(x[..., a:b], w, None, "silu", initial_state=init[s:s + 1], return_final_state=True)
        torch.testing.assert_close(y[..., a:b], ys)
        torch.testing.assert_close(f[s:s + 1], fs)


def test_deterministic_backward():
    tensors = dict(x=torch.randn(2, 16, 50), weight=torch.randn(16, 4), bias=torch.randn(16),
                   initial_state=torch.randn(2, 16, 3))
    _, _, g1 = _grads(_triton, tensors, activation="silu")
    _, _, g2 = _grads(_triton, tensors, activation="silu")
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
