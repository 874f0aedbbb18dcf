"""The Triton Mamba-2 (SSD) kernels against the sequential reference: the output, the final state
and the gradient of every input (against float64 autograd through the reference), over
hypothesis-drawn shapes: heads, groups, N up to 256, headdim and chunk sizes that are not powers
of two, L not a multiple of the chunk, L = 1, initial states, packing and the Δ limit. On a machine
without CUDA the kernels run under TRITON_INTERPRET=1; on the GPU the same tests run compiled."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest.py sets it first; kept for direct runs
pytest.importorskip("triton")

from mambakit import ops  # noqa: E402
from mambakit.ops import knobs, ssd_ref  # noqa: E402
from tests.ops.test_ssd import make_ssd_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-3, atol=2e-3)
INTERPRETED = settings(max_examples=8 if DEVICE == "cpu" else 16, deadline=None, derandomize=True)


def _run(fn, kw, dtype, grad_seed=1, device=DEVICE, **opts):
    """y, the final state and the gradient of every tensor input, for a random cotangent of both."""
    inputs = {k: v.detach().to(device, dtype).requires_grad_() for k, v in kw.items() if v is not None}
    y, h = fn(**inputs, **opts, return_final_state=True)
    g = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(device)
    loss = (y.double() * gy).sum() + (h.double() * gh).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return y.detach().double().cpu(), h.detach().double().cpu(), {k: v.double().cpu() for k, v in zip(inputs, grads)}


def _assert_triton_matches_reference(kw, tol=FP32, dtype=torch.float32, **opts):
    ref_opts = {k: (v.cpu() if k == "cu_seqlens" else v) for k, v in opts.items() if k != "chunk_size"}
    y_ref, h_ref, g_ref = _run(ssd_ref, kw, torch.float64, device="cpu", **ref_opts)
    y, h, g = _run(ops.ssd, kw, dtype, backend="triton", **opts)
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731 - gradients grow with L; compare relative to their size
    torch.testing.assert_close(y, y_ref, rtol=tol["rtol"], atol=tol["atol"] * scale(y_ref))
    torch.testing.assert_close(h, h_ref, rtol=tol["rtol"], atol=tol["atol"] * scale(h_ref))
    assert set(g) == set(g_ref)
    for name, ref in g_ref.items():
        torch.testing.assert_close(g[name], ref, rtol=tol["rtol"], atol=tol["atol"] * scale(ref),
                                   msg=lambda m, name=name: f"d{name}: {m}")


@st.composite
def ssd_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4, 6]))
    headdim = draw(st.sampled_from([4, 12, 16, 33]))
    chunk = draw(st.sampled_from([8, 10, 16, 32]))
    return dict(
        kw=make_ssd_inputs(
            draw(st.integers(1, 2)), draw(st.integers(1, 3 * chunk + 5)), heads, headdim,
            draw(st.sampled_from([g for g in (1, 2, 3) if heads % g == 0])), draw(st.sampled_from([3, 16, 40])),
            D_shape=draw(st.sampled_from([None, (heads,), (heads, headdim)])), with_z=draw(st.booleans()),
            with_bias=draw(st.booleans()), with_init=draw(st.booleans()), seed=draw(st.integers(0, 2**16))),
        opts=dict(chunk_size=chunk, dt_softplus=draw(st.booleans()),
                  dt_limit=draw(st.sampled_from([(0.0, math.inf), (0.05, 0.8)]))))


@INTERPRETED
@given(case=ssd_cases())
def test_triton_ssd_matches_reference(case):
    _assert_triton_matches_reference(case["kw"], **case["opts"])


@pytest.mark.parametrize("length", [1, 16, 17])
def test_single_step_and_chunk_edges(length):
    kw = make_ssd_inputs(1, length, 2, 16, 1, 16, D_shape=(2,), with_init=True, seed=length)
    _assert_triton_matches_reference(kw, chunk_size=16)


def test_largest_state_size():
    """N = 256 (the most mambakit takes) with a 64-wide head: the backward's widest tiles."""
    kw = make_ssd_inputs(1, 20, 2, 64, 1, 256, D_shape=(2,), with_init=True, seed=3)
    _assert_triton_matches_reference(kw, chunk_size=16)


def test_backward_split_heads():
    """Many heads per group: the backward splits them over programs and sums dB, dC after."""
    kw = make_ssd_inputs(1, 21, 4, 8, 1, 8, D_shape=(4, 8), with_bias=True, seed=5)
    with knobs.override(ssd_tiles='{"dcb": {"min_programs": 1000000}, "dbc": {"min_programs": 1000000}}'):  # one head per program: the most splits
        _assert_triton_matches_reference(kw, chunk_size=8, dt_softplus=True)


@pytest.mark.parametrize("tiles", [
    {"state_passing": {"group": 4, "block": 64}, "state_passing_bwd": {"group": 2, "block": 32}},
    {"state_passing": {"group": 8}, "state_passing_bwd": {"group": 8},
     "chunk_output": {"block_m": 32, "block_s": 16, "block_p": 16, "block_k": 16}, "cb": {"block_t": 16},
     "chunk_state": {"block_k": 16, "block_p": 16}, "dx": {"block_s": 16, "block_t": 32, "block_k": 16},
     "dcb": {"block_t": 32, "block_s": 16, "block_k": 16}, "dbc": {"block": 16, "block_n": 16}},
], ids=["state-groups", "every-kernel-retiled"])
def test_other_tiles_give_the_same_result(tiles):
    """Every kernel's settings from ssd_tiles.py change how the work is cut, never the result: the
    state passing in groups of chunks (11 chunks: a group runs past the last chunk, and past the
    first going back), with an initial state and the final state's gradient, and narrower tiles."""
    import json
    kw = make_ssd_inputs(2, 85, 2, 24, 1, 32, D_shape=(2,), with_bias=True, with_init=True, seed=11)
    with knobs.override(ssd_tiles=json.dumps(tiles)):
        _assert_triton_matches_reference(kw, chunk_size=8, dt_softplus=True)


def test_never_written_triangles_are_never_used(monkeypatch):
    """CB and dCB are written only on and below the diagonal (by tiles). The output, dx and dB/dC
    kernels load whole tiles under a mask that is constant along the contiguous axis (so that
    the loads are vector loads) and select the triangle after. With every new buffer filled with
    NaN and tiles that reach past the written ones, a product with a mask instead of a select
    would turn the outputs and gradients into NaN."""
    import json
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    tiles = {"cb": {"block_t": 16}, "chunk_output": {"block_m": 32, "block_s": 16},
             "dx": {"block_s": 32, "block_t": 16}, "dcb": {"block_t": 16, "block_s": 16}, "dbc": {"block": 32}}
    kw = make_ssd_inputs(1, 70, 2, 16, 1, 16, D_shape=(2,), with_bias=True, seed=4)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert torch.empty(4).isnan().all()  # the fill is on: never-written memory reads as NaN
        with knobs.override(ssd_tiles=json.dumps(tiles)):
            _assert_triton_matches_reference(kw, chunk_size=32, dt_softplus=True)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("text,match", [
    ('{"no_kernel": {}}', "unknown kernel"), ('{"dx": {"block_s": 24}}', "power of two"),
    ('{"dx": {"blocks": 16}}', "no setting 'blocks'"), ('{"dx": {"32": {"block_s": 16}}}', "width 32"),
    ("[1]", "JSON object"), ("{bad", "not valid JSON"), ("no/such/file.json", "no file"),
])
def test_bad_tiles_name_the_knob(text, match):
    kw = make_ssd_inputs(1, 8, 1, 4, 1, 4, seed=1)
    with knobs.override(ssd_tiles=text), pytest.raises(ValueError, match=f"MAMBAKIT_SSD_TILES.*{match}"):
        ops.ssd(**{k: v.to(DEVICE, torch.float32) for k, v in kw.items() if v is not None}, backend="triton")


@pytest.mark.parametrize("lengths", [[5, 17, 1], [7, 9, 8]], ids=["uneven-one-at-a-time", "even-padded-batch"])
def test_packed_sequences_match_the_reference(lengths):
    """Packed sequences restart from their own initial states: outputs, final states and every
    gradient, both when they run one at a time and when they run as one padded batch."""
    kw = make_ssd_inputs(1, sum(lengths), 2, 16, 2, 16, D_shape=(2,), with_bias=True, with_init=True,
                         n_seqs=len(lengths), seed=7)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    _assert_triton_matches_reference(kw, chunk_size=8, dt_softplus=True, cu_seqlens=cu)


def test_a_sequence_in_a_padded_batch_is_bitwise_the_sequence_alone():
    """Decoding packs prompts of different lengths and must give each the tokens it gets alone:
    the padded batch computes each row exactly as the row alone (the same chunk grid). On CPU the
    step sizes come in without softplus: torch's CPU softplus rounds a tensor's SIMD body and its
    tail differently, so the same value may differ in the last bit between two lengths."""
    lengths = [7, 9, 8]
    softplus = DEVICE == "cuda"
    kw = make_ssd_inputs(1, sum(lengths), 2, 16, 1, 16, D_shape=(2,), with_bias=softplus, seed=9, dtype=torch.float32)
    kw = {k: v.to(DEVICE) if v is not None else None for k, v in kw.items()}
    offsets = [0, 7, 16, 24]
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    y, h = ops.ssd(**kw, cu_seqlens=cu, chunk_size=8, dt_softplus=softplus, return_final_state=True, backend="triton")
    for s, (start, end) in enumerate(zip(offsets, offsets[1:])):
        part = {k: (v[:, start:end] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
        y1, h1 = ops.ssd(**part, chunk_size=8, dt_softplus=softplus, return_final_state=True, backend="triton")
        assert torch.equal(y[:, start:end], y1) and torch.equal(h[s:s + 1], h1)


_HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter multiplies bf16 tiles as raw uint16 bits"))]


@pytest.mark.parametrize("dtype", _HALF)
def test_half_inputs_accumulate_in_fp32(dtype):
    """fp16/bf16 x, B, C: y in that dtype within its rounding of the float64 answer, the state in fp32."""
    kw = make_ssd_inputs(2, 40, 4, 16, 2, 16, D_shape=(4,), with_z=True, with_init=True, seed=11)
    half = {k: (v.to(dtype) if k in ("x", "B", "C", "z") else v.float()).to(DEVICE) if v is not None else None
            for k, v in kw.items()}
    y, h = ops.ssd(**half, return_final_state=True, dt_softplus=True, chunk_size=16, backend="triton")
    assert y.dtype == dtype and h.dtype == torch.float32
    y_ref, h_ref = ssd_ref(**{k: (v.double().cpu() if v is not None else None) for k, v in half.items()},
                           dt_softplus=True, return_final_state=True)
    err = (y.double().cpu() - y_ref).abs().max() / y_ref.abs().max()
    assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), err  # low-precision products, fp32 sums
    h_err = (h.double().cpu() - h_ref).abs().max() / h_ref.abs().max()
    assert h_err < (2e-2 if dtype == torch.bfloat16 else 3e-3), h_err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(2, 1000, 8, 64, 1, 128), (1, 4096, 4, 64, 2, 64), (1, 300, 2, 32, 1, 256)])
def test_compiled_kernels_at_model_shapes(shape):
    """The compiled kernels at the 130m mixer's head shape (headdim 64, N 128) with the default chunk,
    against the chunked torch path in float64 on the GPU (itself tested against the sequential
    reference in test_ssd.py; the sequential loop is too slow at these lengths)."""
    batch, length, heads, headdim, groups, d_state = shape
    kw = make_ssd_inputs(batch, length, heads, headdim, groups, d_state, D_shape=(heads,), with_bias=True,
                         with_init=True, seed=13)
    opts = dict(chunk_size=256, dt_softplus=True)
    y_ref, h_ref, g_ref = _run(ops.ssd, kw, torch.float64, backend="torch", **opts)
    y, h, g = _run(ops.ssd, kw, torch.float32, backend="triton", **opts)
    for name, got, want in [("y", y, y_ref), ("final", h, h_ref)] + [(f"d{k}", g[k], g_ref[k]) for k in g_ref]:
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * max(1.0, want.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_inputs_that_are_views_into_one_projection():
    """The Mamba-2 mixer hands the scan x, B, C and dt as views into one projection (b, L, width),
    strided by the width: the gradient of that projection is the reference's (a kernel that wrote
    dt's gradient with dt's strides into a dense buffer wrote past its end on the GPU)."""
    heads, headdim, d_state, length = 2, 8, 16, 37
    widths = [heads * headdim, d_state, d_state, heads]  # x, B, C, dt
    g = torch.Generator().manual_seed(13)
    proj = torch.randn(2, length, sum(widths) + 3, generator=g, dtype=torch.float64)  # 3 unused columns
    A = -(torch.rand(heads, generator=g, dtype=torch.float64) + 0.2)
    gy = torch.randn(2, length, heads, headdim, generator=g, dtype=torch.float64)

    def grad_of_projection(fn, dtype, device, **opts):
        leaf = proj.to(device, dtype, copy=True).requires_grad_()
        x, B, C, dt = leaf[..., :sum(widths)].split(widths, dim=-1)
        y = fn(x=x.unflatten(-1, (heads, headdim)), dt=dt, A=A.to(device, dtype), B=B.unsqueeze(2),
               C=C.unsqueeze(2), dt_softplus=True, **opts)
        (y.double() * gy.to(device)).sum().backward()
        return leaf.grad.double().cpu()

    want = grad_of_projection(ssd_ref, torch.float64, "cpu")
    got = grad_of_projection(ops.ssd, torch.float32, DEVICE, backend="triton", chunk_size=16)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3 * want.abs().max().item())
