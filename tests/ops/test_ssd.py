"""The Mamba-2 (SSD) scan: the quadratic dual form and the chunked torch path against the
sequential reference (hypothesis over shapes, chunk boundaries, packing), gradients of every
input against float64 autograd through the reference, and the argument checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit import ops
from mambakit.ops import ssd_dual_ref, ssd_ref

TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.float64: dict(rtol=1e-10, atol=1e-10)}
FAST = settings(max_examples=30, deadline=None, derandomize=True)


def make_ssd_inputs(batch, length, heads, headdim, groups, d_state, dtype=torch.float64, *, D_shape=None,
                    with_z=False, with_bias=False, with_init=False, n_seqs=None, seed=0, requires_grad=False):
    """Random SSD inputs: x, z (batch, L, H, P); dt (batch, L, H); A (H,) < 0; B, C (batch, L, G, N)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    kw = dict(
        x=rnd(batch, length, heads, headdim), dt=rnd(batch, length, heads, scale=0.5, shift=-1.0).abs(),
        A=-(torch.rand(heads, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype),
        B=rnd(batch, length, groups, d_state), C=rnd(batch, length, groups, d_state),
        D=None if D_shape is None else rnd(*D_shape), z=rnd(batch, length, heads, headdim) if with_z else None,
        dt_bias=rnd(heads, scale=0.3) if with_bias else None,
        initial_state=rnd(n_seqs or batch, heads, headdim, d_state) if with_init else None)
    if requires_grad:
        kw = {k: (v.requires_grad_() if v is not None else None) for k, v in kw.items()}
    return kw


@st.composite
def ssd_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    headdim = draw(st.sampled_from([1, 3, 4]))
    return dict(
        batch=draw(st.integers(1, 2)), length=draw(st.integers(1, 70)), heads=heads, headdim=headdim,
        groups=draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0])),
        d_state=draw(st.sampled_from([1, 2, 5, 16])),
        D_shape=draw(st.sampled_from([None, (heads,), (heads, headdim)])), with_z=draw(st.booleans()),
        with_bias=draw(st.booleans()), with_init=draw(st.booleans()), softplus=draw(st.booleans()),
        dt_limit=draw(st.sampled_from([(0.0, math.inf), (0.05, 0.8)])), seed=draw(st.integers(0, 2**16)))


def _inputs(case, dtype=torch.float64, **extra):
    opts = {k: case[k] for k in ("D_shape", "with_z", "with_bias", "with_init", "seed")}
    return make_ssd_inputs(case["batch"], case["length"], case["heads"], case["headdim"], case["groups"],
                           case["d_state"], dtype, **opts, **extra)


@FAST
@given(case=ssd_cases())
def test_dual_form_matches_sequential_reference(case):
    kw = _inputs(case)
    opts = dict(dt_softplus=case["softplus"], dt_limit=case["dt_limit"], return_final_state=True)
    y_ref, h_ref = ssd_ref(**kw, **opts)
    y, h = ssd_dual_ref(**kw, **opts)
    assert y.shape == kw["x"].shape and h.shape == (case["batch"], case["heads"], case["headdim"], case["d_state"])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])


@FAST
@given(case=ssd_cases(), chunk=st.sampled_from([1, 2, 4, 7, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_chunked_ssd_matches_reference(case, chunk, dtype):
    kw = _inputs(case, dtype)
    opts = dict(dt_softplus=case["softplus"], dt_limit=case["dt_limit"], return_final_state=True)
    y_ref, h_ref = ssd_ref(**kw, **opts)
    y, h = ops.ssd(**kw, **opts, chunk_size=chunk)
    assert y.dtype == dtype and y.shape == y_ref.shape and h.dtype == h_ref.dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])


@pytest.mark.parametrize("length,chunk", [(1, 1), (1, 256), (16, 4), (64, 16), (63, 16), (65, 16), (256, 256)])
def test_chunk_boundaries(length, chunk):
    kw = make_ssd_inputs(1, length, 2, 3, 1, 4, D_shape=(2,), with_z=True, with_init=True, seed=length)
    y_ref, h_ref = ssd_ref(**kw, dt_softplus=True, return_final_state=True)
    y, h = ops.ssd(**kw, dt_softplus=True, return_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])


def test_largest_state_size_and_default_chunk():
    kw = make_ssd_inputs(1, 9, 2, 2, 2, 256, D_shape=(2,), with_init=True, seed=3)
    y_ref, h_ref = ssd_ref(**kw, return_final_state=True)
    y, h = ops.ssd(**kw, return_final_state=True)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(h, h_ref, **TOL[torch.float64])
    torch.testing.assert_close(ssd_dual_ref(**kw), y_ref, **TOL[torch.float64])


def test_fp32_inputs_return_fp32_and_bf16_accumulates_in_fp32():
    kw32 = make_ssd_inputs(2, 300, 4, 8, 2, 16, torch.float32, D_shape=(4,), with_z=True, seed=1)
    y_ref, h_ref = ssd_ref(**kw32, dt_softplus=True, return_final_state=True)
    y, h = ops.ssd(**kw32, dt_softplus=True, return_final_state=True, chunk_size=64)
    assert h.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    kw16 = {k: None if v is None else v.to(torch.bfloat16) for k, v in kw32.items()}
    y16, h16 = ops.ssd(**kw16, dt_softplus=True, return_final_state=True, chunk_size=64)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    torch.testing.assert_close(y16, ssd_ref(**kw16, dt_softplus=True), rtol=3e-2, atol=5e-2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), with_init=st.booleans(),
       chunk=st.sampled_from([1, 4, 7, 64]), seed=st.integers(0, 2**16))
def test_packed_sequences_match_separate_runs(lengths, with_init, chunk, seed):
    n = len(lengths)
    kw = make_ssd_inputs(1, sum(lengths), 4, 3, 2, 5, D_shape=(4, 3), with_z=True, with_bias=True,
                         with_init=with_init, n_seqs=n, seed=seed)
    offsets = [0] + torch.tensor(lengths).cumsum(0).tolist()
    cu = torch.tensor(offsets, dtype=torch.int32 if seed % 2 else torch.int64)
    opts = dict(dt_softplus=True, return_final_state=True)
    ys, hs = [], []
    for s, (a, b) in enumerate(zip(offsets, offsets[1:])):
        one = {k: v for k, v in kw.items() if k not in ("x", "dt", "B", "C", "z", "initial_state")}
        h0 = None if kw["initial_state"] is None else kw["initial_state"][s:s + 1]
        y_s, h_s = ssd_ref(kw["x"][:, a:b], kw["dt"][:, a:b], B=kw["B"][:, a:b], C=kw["C"][:, a:b],
                           z=kw["z"][:, a:b], initial_state=h0, **one, **opts)
        ys.append(y_s)
        hs.append(h_s)
    y_sep, h_sep = torch.cat(ys, dim=1), torch.cat(hs, dim=0)
    for fn in (ssd_ref, ssd_dual_ref, lambda **k: ops.ssd(**k, chunk_size=chunk)):
        y, h = fn(**kw, **opts, cu_seqlens=cu)
        assert h.shape == (n, 4, 3, 5)
        torch.testing.assert_close(y, y_sep, **TOL[torch.float64])
        torch.testing.assert_close(h, h_sep, **TOL[torch.float64])


@pytest.mark.parametrize("chunk", [3, 256])
def test_two_halves_with_carried_state_equal_one_run(chunk):
    kw = make_ssd_inputs(2, 41, 2, 3, 1, 6, D_shape=(2,), with_z=True, with_bias=True, with_init=True, seed=7)
    opts = dict(dt_softplus=True, return_final_state=True)
    y_all, h_all = ops.ssd(**kw, **opts, chunk_size=chunk)
    cut = 17
    first = {k: (v[:, :cut] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    second = {k: (v[:, cut:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    y1, h1 = ops.ssd(**first, **opts, chunk_size=chunk)
    second["initial_state"] = h1
    y2, h2 = ops.ssd(**second, **opts, chunk_size=chunk)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_all, **TOL[torch.float64])
    torch.testing.assert_close(h2, h_all, **TOL[torch.float64])


GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


@pytest.mark.parametrize("D_shape,chunk,packed", [((2,), 4, False), ((2, 3), 5, False), ((2,), 3, True)])
def test_gradients_match_reference(D_shape, chunk, packed):
    def grads(fn):
        kw = make_ssd_inputs(1, 13, 2, 3, 1, 4, D_shape=D_shape, with_z=True, with_bias=True, with_init=True,
                             n_seqs=2 if packed else None, seed=11, requires_grad=True)
        cu = torch.tensor([0, 6, 13]) if packed else None
        y, h = fn(**kw, dt_softplus=True, dt_limit=(0.0, 5.0), return_final_state=True, cu_seqlens=cu)
        g = torch.Generator().manual_seed(5)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + \
            (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
        return dict(zip(GRAD_NAMES, torch.autograd.grad(loss, [kw[n] for n in GRAD_NAMES])))

    expect = grads(ssd_ref)
    got = grads(lambda **k: ops.ssd(**k, chunk_size=chunk))
    for name in GRAD_NAMES:
        assert torch.count_nonzero(expect[name]) > 0, name
        torch.testing.assert_close(got[name], expect[name], rtol=1e-9, atol=1e-10, msg=name)


def test_gradcheck_of_chunked_path():
    kw = make_ssd_inputs(1, 5, 2, 2, 1, 3, D_shape=(2,), with_z=True, with_bias=True, with_init=True, seed=2,
                         requires_grad=True)
    names = list(GRAD_NAMES)
    torch.autograd.gradcheck(
        lambda *args: ops.ssd(**dict(zip(names, args)), dt_softplus=True, return_final_state=True, chunk_size=2),
        [kw[n] for n in names])


# ---- bad input ------------------------------------------------------------------------------------

def _good(**over):
    kw = make_ssd_inputs(1, 6, 4, 3, 2, 5, D_shape=(4,), with_z=True, with_bias=True, with_init=True, seed=0)
    kw.update(over)
    return kw


f64 = dict(dtype=torch.float64)
BAD = [
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(1, 6, 4, **f64)), ValueError, "x must have 4 dims"),
    (dict(x=torch.zeros(1, 0, 4, 3, **f64)), ValueError, "x has sequence length L=0"),
    (dict(x=torch.zeros(1, 6, 4, 3, dtype=torch.int64)), TypeError, "x must be a real floating"),
    (dict(dt=torch.zeros(1, 6, 3, **f64)), ValueError, "dt must have shape"),
    (dict(A=torch.zeros(4, 5, **f64)), ValueError, "A must have 1 dims"),
    (dict(A=torch.zeros(3, **f64)), ValueError, "A must have shape"),
    (dict(B=torch.zeros(1, 6, 3, 5, **f64), C=torch.zeros(1, 6, 3, 5, **f64)), ValueError, "G=3 groups"),
    (dict(B=torch.zeros(1, 6, 2, 257, **f64), C=torch.zeros(1, 6, 2, 257, **f64)), ValueError, "N=257"),
    (dict(B=torch.zeros(1, 5, 2, 5, **f64)), ValueError, "B must have shape"),
    (dict(C=torch.zeros(1, 6, 2, 4, **f64)), ValueError, "C must have shape"),
    (dict(D=torch.zeros(3, **f64)), ValueError, "D must have shape"),
    (dict(D=torch.zeros(4, 2, **f64)), ValueError, "D must have shape"),
    (dict(D=torch.zeros(4, 3, 1, **f64)), ValueError, "D must have 1 or 2 dims"),
    (dict(z=torch.zeros(1, 6, 4, 2, **f64)), ValueError, "z must have shape"),
    (dict(dt_bias=torch.zeros(2, **f64)), ValueError, "dt_bias must have shape"),
    (dict(initial_state=torch.zeros(2, 4, 3, 5, **f64)), ValueError, "initial_state must have shape"),
    (dict(initial_state=torch.zeros(4, 3, 5, **f64)), ValueError, "initial_state must have 4 dims"),
    (dict(dt_limit=0.5), TypeError, "dt_limit must be a pair"),
    (dict(dt_limit=(0.1, 0.2, 0.3)), TypeError, "dt_limit must be a pair"),
    (dict(dt_limit=("a", 1.0)), TypeError, "dt_limit must hold two real numbers"),
    (dict(dt_limit=(0.5, 0.1)), ValueError, "dt_limit"),
    (dict(dt_limit=(-0.1, 1.0)), ValueError, "dt_limit"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(chunk_size=True), TypeError, "chunk_size"),
    (dict(cu_seqlens=[0, 6]), TypeError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([1, 6]), initial_state=None), ValueError, "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 5]), initial_state=None), ValueError, "end at L=6"),
    (dict(cu_seqlens=torch.tensor([0, 3, 3, 6]), initial_state=None), ValueError, "strictly increasing"),
    (dict(cu_seqlens=torch.tensor([0, 2, 6])), ValueError, "initial_state must have shape"),
    (dict(A=torch.zeros(4, device="meta", **f64)), ValueError, "A is on meta"),
]


@pytest.mark.parametrize("fn", ["ssd", "ssd_ref", "ssd_dual_ref"])
@pytest.mark.parametrize("over,exc,match", BAD, ids=lambda v: None if isinstance(v, (dict, type)) else v)
def test_bad_input_names_the_argument(fn, over, exc, match):
    if "chunk_size" in over and fn != "ssd":
        pytest.skip("only ops.ssd takes chunk_size")
    with pytest.raises(exc, match=match):
        getattr(ops, fn)(**_good(**over))


def test_cu_seqlens_needs_batch_one():
    kw = make_ssd_inputs(2, 6, 2, 3, 1, 4, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens needs the sequences packed along L with batch 1"):
        ops.ssd(**kw, cu_seqlens=torch.tensor([0, 3, 6]))


def test_forced_triton_backend_refuses_float64():
    with pytest.raises(ValueError, match="float64"):
        ops.ssd(**_good(), backend="triton")


def test_mamba1_scan_names_cu_seqlens_given_as_a_list():
    """The device check shared with selective_scan used to read `.device` off a list first."""
    u = torch.zeros(1, 2, 6)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32/int64 torch.Tensor"):
        ops.selective_scan(u, u, torch.zeros(2, 3), torch.zeros(1, 3, 6), torch.zeros(1, 3, 6), cu_seqlens=[0, 6])
