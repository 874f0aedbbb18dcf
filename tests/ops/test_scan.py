"""The chunked torch scan against the sequential reference: outputs over many shapes
(hypothesis), and gradients of every input against float64 autograd through the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit.ops import selective_scan, selective_scan_chunked, selective_scan_ref
from mambakit.ops.scan import INNER_METHODS
from tests.scan_inputs import make_scan_inputs

TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.float64: dict(rtol=1e-9, atol=1e-9)}


@st.composite
def scan_cases(draw):
    groups = draw(st.sampled_from([None, 1, 2, 3]))
    dim = (groups or 1) * draw(st.integers(1, 4))
    return dict(
        batch=draw(st.integers(1, 2)), dim=dim, length=draw(st.integers(1, 70)), d_state=draw(st.integers(1, 64)),
        groups=groups, with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_bias=draw(st.booleans()),
        with_init=draw(st.booleans()), softplus=draw(st.booleans()), chunk=draw(st.sampled_from([1, 3, 16, 64])),
        inner=draw(st.sampled_from(INNER_METHODS)), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None)
@given(scan_cases())
def test_chunked_scan_matches_reference(case):
    kw = make_scan_inputs(case["batch"], case["dim"], case["length"], case["d_state"], case["groups"], case["dtype"],
                          with_D=case["with_D"], with_z=case["with_z"], with_bias=case["with_bias"],
                          with_init=case["with_init"], seed=case["seed"])
    if not case["softplus"]:  # without softplus the caller passes a positive step size
        kw["delta"] = kw["delta"].abs()
    opts = dict(delta_softplus=case["softplus"], return_final_state=True)
    y_ref, h_ref = selective_scan_ref(**kw, **opts)
    y, h = selective_scan_chunked(**kw, **opts, chunk_size=case["chunk"], inner=case["inner"])
    assert y.dtype == kw["u"].dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL[case["dtype"]])
    torch.testing.assert_close(h, h_ref, **TOL[case["dtype"]])


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), with_init=st.booleans(),
       chunk=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**16))
def test_chunked_scan_varlen_matches_reference(lengths, with_init, chunk, seed):
    kw = make_scan_inputs(1, 4, sum(lengths), 5, groups=2, dtype=torch.float64, with_init=with_init,
                          n_seqs=len(lengths), seed=seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    opts = dict(delta_softplus=True, return_final_state=True, cu_seqlens=cu)
    y_ref, h_ref = selective_scan_ref(**kw, **opts)
    y, h = selective_scan_chunked(**kw, **opts, chunk_size=chunk)
    assert h.shape == (len(lengths), 4, 5)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])


def test_bf16_inputs_accumulate_in_fp32():
    kw = make_scan_inputs(2, 8, 300, 16, dtype=torch.bfloat16)
    y_ref = selective_scan_ref(**kw, delta_softplus=True)
    y = selective_scan(**kw, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=5e-2)


def _grads(fn, kw, **opts):
    inputs = {k: v.detach().clone().requires_grad_() for k, v in kw.items() if v is not None}
    y, h = fn(**inputs, **opts, return_final_state=True)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + \
        (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    names = sorted(inputs)
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names])))


@pytest.mark.parametrize("inner", INNER_METHODS)
@pytest.mark.parametrize("groups,length,chunk", [(None, 1, 4), (None, 13, 4), (2, 37, 8), (3, 64, 16), (1, 50, 64)])
def test_gradients_match_float64_reference(inner, groups, length, chunk):
    kw = make_scan_inputs(2, 6, length, 5, groups=groups, dtype=torch.float64, with_init=True)
    ref = _grads(selective_scan_ref, kw, delta_softplus=True)
    got = _grads(selective_scan_chunked, kw, delta_softplus=True, chunk_size=chunk, inner=inner)
    assert set(got) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"}
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_gradients_without_optional_inputs_and_varlen():
    kw = make_scan_inputs(1, 4, 11, 3, dtype=torch.float64, with_D=False, with_z=False, with_bias=False,
                          with_init=True, n_seqs=2)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    ref = _grads(selective_scan_ref, kw, cu_seqlens=cu)
    got = _grads(selective_scan_chunked, kw, cu_seqlens=cu, chunk_size=3)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-8, atol=1e-10)


def test_gradcheck_fp64():
    kw = make_scan_inputs(1, 2, 6, 2, dtype=torch.float64, with_init=True, requires_grad=True)
    names = list(kw)

    def fn(*args):
        y, h = selective_scan_chunked(**dict(zip(names, args)), delta_softplus=True, return_final_state=True,
                                      chunk_size=4)
        return y, h
    assert torch.autograd.gradcheck(fn, tuple(kw[n] for n in names))


def test_saved_memory_is_bounded_by_chunk_not_length():
    """What the backward keeps is the inputs plus one (B, D, N) state per chunk, never the
    (B, D, L, N) states."""
    batch, dim, length, d_state, chunk = 1, 64, 512, 16, 64
    kw = make_scan_inputs(batch, dim, length, d_state, requires_grad=True)
    y = selective_scan_chunked(**kw, delta_softplus=True, chunk_size=chunk)
    saved = sum(t.numel() for t in y.grad_fn.saved_tensors if t is not None)
    inputs = sum(v.numel() for v in kw.values() if v is not None)
    per_step_states = batch * dim * length * d_state
    assert saved - inputs - batch * dim * length <= per_step_states // chunk
    assert saved < per_step_states / 2


def test_backend_argument():
    kw = make_scan_inputs(1, 3, 5, 2)
    torch.testing.assert_close(selective_scan(**kw, backend="reference"), selective_scan(**kw, backend="torch"),
                               **TOL[torch.float32])
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**kw, backend="cuda-magic")


@pytest.mark.parametrize("batch,dim,d_state", [(1, 1536, 16), (4, 1536, 16), (64, 5120, 16), (1, 8, 1)])
def test_auto_chunk_size_keeps_the_chunk_buffer_bounded(batch, dim, d_state):
    from mambakit.ops.scan import CHUNK_ELEMENTS, MAX_CHUNK, MIN_CHUNK, auto_chunk_size
    T = auto_chunk_size(batch, dim, d_state)
    assert MIN_CHUNK <= T <= MAX_CHUNK and T & (T - 1) == 0
    assert T == MIN_CHUNK or T * batch * dim * d_state <= CHUNK_ELEMENTS
    assert T == MAX_CHUNK or 2 * T * batch * dim * d_state > CHUNK_ELEMENTS
