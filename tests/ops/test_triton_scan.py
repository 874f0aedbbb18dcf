"""The Triton selective scan against the sequential reference: every output and every gradient.
On a machine without CUDA the kernels run under TRITON_INTERPRET=1 at small shapes; on the
device the same tests run the compiled kernels."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest.py sets it first; kept for direct runs
pytest.importorskip("triton")

from mambakit.ops import knobs, selective_scan, selective_scan_ref  # noqa: E402
from tests.scan_inputs import make_scan_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=6e-4, atol=2e-3)
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _run(fn, kw, grad_seed=1, **opts):
    inputs = {k: v.detach().clone().to(DEVICE).requires_grad_() for k, v in kw.items() if v is not None}
    y, h = fn(**inputs, **opts, return_final_state=True)
    g = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    gh = torch.randn(h.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((y.float() * gy).sum() + (h * gh).sum(), list(inputs.values()))
    return y.detach(), h.detach(), dict(zip(inputs, grads))


def _triton(**kw):
    return selective_scan(**kw, backend="triton")


def _assert_matches_reference(kw):
    """Every output and every gradient of the Triton scan against the reference (fp32 tolerances)."""
    y_ref, h_ref, g_ref = _run(selective_scan_ref, kw, delta_softplus=True)
    y, h, g = _run(_triton, kw, delta_softplus=True)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(h, h_ref, **FP32)
    assert set(g) == set(g_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **FP32, msg=lambda m, name=name: f"d{name}: {m}")


CASES = {
    "plain": dict(batch=2, dim=4, length=13, d_state=5),
    "odd-L-groups": dict(batch=1, dim=8, length=37, d_state=16, groups=2),
    "L1": dict(batch=2, dim=4, length=1, d_state=3),
    "no-optionals": dict(batch=1, dim=4, length=20, d_state=4, with_D=False, with_z=False, with_bias=False),
    "many-groups": dict(batch=1, dim=6, length=9, d_state=8, groups=3),
    "long-multi-chunk": dict(batch=1, dim=2, length=150, d_state=2),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("with_init", [False, True])
def test_outputs_and_gradients_match_reference(case, with_init):
    _assert_matches_reference(make_scan_inputs(**case, with_init=with_init))


@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize("lengths", [[3, 1, 6], [17], [5, 12]])
def test_varlen_matches_reference(lengths, prefetch):
    """Packed sequences, with and without the forward's prefetch of the next chunk (which
    must read nothing past each sequence's end)."""
    kw = make_scan_inputs(1, 4, sum(lengths), 5, groups=2, with_init=True, n_seqs=len(lengths))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    y_ref, h_ref, g_ref = _run(selective_scan_ref, kw, delta_softplus=True, cu_seqlens=cu.to(DEVICE))
    with knobs.override(scan_fwd_prefetch=True if prefetch == "1" else None):
        y, h, g = _run(_triton, kw, delta_softplus=True, cu_seqlens=cu.to(DEVICE))
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(h, h_ref, **FP32)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **FP32, msg=lambda m, name=name: f"d{name}: {m}")


def test_no_softplus():
    kw = make_scan_inputs(1, 4, 11, 3)
    kw["delta"] = kw["delta"].abs()
    y_ref, h_ref, g_ref = _run(selective_scan_ref, kw)
    y, h, g = _run(_triton, kw)
    torch.testing.assert_close(y, y_ref, **FP32)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **FP32)


def test_backward_is_deterministic():
    kw = make_scan_inputs(2, 8, 40, 4, groups=2, with_init=True)
    _, _, g1 = _run(_triton, kw, delta_softplus=True)
    _, _, g2 = _run(_triton, kw, delta_softplus=True)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_triton_backend_refuses_float64():
    kw = make_scan_inputs(1, 2, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        selective_scan(**{k: v.to(DEVICE) if v is not None else None for k, v in kw.items()}, backend="triton")


def test_time_major_inputs_are_read_through_their_strides():
    """The Mamba mixer passes views of (B, L, D) tensors; the kernel must not assume (B, D, L)."""
    kw = make_scan_inputs(2, 8, 21, 4, groups=2, with_init=True)
    y_ref, h_ref, g_ref = _run(selective_scan_ref, kw, delta_softplus=True)

    def time_major(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    def triton_time_major(u, delta, z, **rest):
        return _triton(u=time_major(u), delta=time_major(delta), z=time_major(z), **rest)
    assert not time_major(kw["u"]).is_contiguous()
    y, h, g = _run(triton_time_major, kw, delta_softplus=True)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(h, h_ref, **FP32)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **FP32, msg=lambda m, name=name: f"d{name}: {m}")


def test_b_and_c_strided_in_time_match_reference():
    """B and C as views of (B, L, N) tensors (time stride N): the lanes kernels may then not
    assume a chunk's steps lie in one thread (their ordered reductions would be wrong on the
    GPU), and every output and gradient still matches the reference."""
    from mambakit.ops.triton.scan_plan import plan_scan
    kw = make_scan_inputs(1, 8, 16, 16, with_init=True)  # L % 16 == 0 and 16 x 8 (state, channel) pairs

    def strided(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)  # (b, N, L) with stride (L*N, 1, N)

    kw["B"], kw["C"] = strided(kw["B"]), strided(kw["C"])
    assert kw["B"].stride(-1) == 16
    plan = plan_scan(kw["u"].to(DEVICE), kw["B"].to(DEVICE), kw["A"].to(DEVICE), None)
    assert not plan.forward.meta["ORDERED"] and not plan.backward.meta["ORDERED"]
    contiguous = plan_scan(kw["u"].to(DEVICE), kw["B"].contiguous().to(DEVICE), kw["A"].to(DEVICE), None)
    assert contiguous.forward.meta["ORDERED"]  # the same shapes with B contiguous in time
    _assert_matches_reference(kw)


@pytest.mark.parametrize("case", [dict(batch=1, dim=4, length=200, d_state=4, groups=2),
                                  dict(batch=2, dim=2, length=160, d_state=8),
                                  dict(batch=1, dim=2, length=129, d_state=3)], ids=["groups", "batch2", "odd-L"])
@pytest.mark.parametrize("with_init", [False, True])
def test_segmented_scan_matches_reference(case, with_init):
    """Few rows and a long sequence: the lanes kernels cut each sequence into segments (a
    summary pass, then each segment from its true start state; the backward likewise from its
    true end adjoint). Forced here at small shapes; outputs, final state and every gradient."""
    from mambakit.ops.triton.scan_plan import segment_plan
    with knobs.override(scan_seg_below=1000000, scan_seg_rows=1000000, scan_min_seg=16):
        seg_len, n_segs = segment_plan(case["batch"] * case["dim"], case["length"], False, 16)
        assert n_segs >= 3 and seg_len % 64 == 0 and (n_segs - 1) * seg_len < case["length"] <= n_segs * seg_len
        kw = make_scan_inputs(**case, with_init=with_init)
        _assert_matches_reference(kw)


def test_segment_plan():
    """Segments only where rows are few; aligned, covering L, none shorter than the minimum."""
    from mambakit.ops.triton.scan_plan import segment_plan
    assert segment_plan(8 * 1536, 2048, False, 16) == (0, 1)  # enough rows already
    assert segment_plan(1536, 131072, True, 16) == (0, 1)  # packed sequences: never
    for rows, length in [(1536, 131072), (3072, 8192), (1536, 32768), (768, 1000), (1536, 300)]:
        seg_len, n_segs = segment_plan(rows, length, False, 16)
        if n_segs > 1:
            assert seg_len % 64 == 0 and seg_len >= 512 and (n_segs - 1) * seg_len < length <= n_segs * seg_len
    assert segment_plan(1536, 131072, False, 16)[1] >= 8


def test_packed_sequences_save_states_by_chunk_not_by_sequence():
    """Many short packed sequences must not each reserve state rows for the whole length."""
    from mambakit.ops.triton.scan_op import selective_scan_fwd
    from mambakit.ops.triton.scan_plan import plan_scan
    lengths = [40] * 20
    kw = make_scan_inputs(1, 4, sum(lengths), 3, with_init=True, n_seqs=len(lengths))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    kw = {k: v.to(DEVICE) for k, v in kw.items()}
    _, _, states = selective_scan_fwd(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                      kw["delta_bias"], kw["initial_state"], cu, True, True)
    plan = plan_scan(kw["u"], kw["B"], kw["A"], cu)
    assert states.shape[0] == plan.n_chunks + len(lengths) < len(lengths) * plan.n_chunks


@pytest.mark.parametrize("lanes", [dict(NL=2, BLOCK_D=16, STAGES=1, PREFETCH=False),
                                   dict(NL=2, BLOCK_D=16, STAGES=1, PREFETCH=True),
                                   dict(NL=4, BLOCK_D=8, STAGES=3, PREFETCH=False),
                                   dict(NL=8, BLOCK_D=4, STAGES=2, PREFETCH=False)],
                         ids=["8-states", "8-states-prefetch", "4-states", "2-states"])
def test_lanes_forward_shapes_match_reference(lanes):
    """The lanes forward at each of its register shapes (the launcher picks one from the number
    of rows, so a small test would otherwise see only one), with saved states every 16 steps,
    with and without the register prefetch of the next chunk (L = 45: the last chunk is partial,
    and the prefetch past the end must read nothing)."""
    from mambakit.ops.triton.scan_launch import scan_fwd
    kw = make_scan_inputs(2, 32, 45, 16, with_init=True)
    y_ref, h_ref = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True)
    args = [kw[k].to(DEVICE) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    y, h, states = scan_fwd(*args, True, None, True, lanes=lanes)  # fp32: states saved every 16 steps
    torch.testing.assert_close(y, y_ref.to(DEVICE), **FP32)
    torch.testing.assert_close(h, h_ref.to(DEVICE), **FP32)
    # the state saved at step 32 is the reference's final state after the first 32 steps
    first32 = {k: (v[..., :32] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    _, h32 = selective_scan_ref(**first32, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(states.view(2, -1, 32, 16)[:, 2], h32.to(DEVICE), **FP32)


def test_bf16_inputs_save_bf16_states_every_8_steps():
    """bf16 inputs: the lanes forward saves bf16 states every 8 steps (save_interval) and the
    backward takes each chunk back from one; outputs and gradients stay within the official
    bf16 tolerances of the fp32 reference on the same (bf16-rounded) inputs."""
    from mambakit.ops.triton.scan_launch import scan_fwd
    kw = make_scan_inputs(batch=2, dim=8, length=45, d_state=4, with_init=True)
    bf16 = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    y_ref, h_ref, g_ref = _run(selective_scan_ref, {k: v.float() if v is not None else v for k, v in bf16.items()},
                               delta_softplus=True)
    y, h, g = _run(_triton, bf16, delta_softplus=True)
    tol = dict(rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(h, h_ref, **tol)
    for name in g_ref:
        torch.testing.assert_close(g[name].float(), g_ref[name], **tol, msg=lambda m, name=name: f"d{name}: {m}")
    args = [bf16[k].to(DEVICE) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    _, _, states = scan_fwd(*args, None, True, None, True)
    assert states.dtype == torch.bfloat16 and states.shape == (2 * 6, 8, 4)  # cdiv(45, 8) = 6 per sequence


def test_custom_op_autograd_matches_reference(monkeypatch):
    """Eager training goes through scan_op._EagerScan; torch.compile through the custom ops'
    registered autograd. Both must give the reference's gradients: here the custom-op path."""
    from mambakit.ops.triton import scan_op
    monkeypatch.setattr(scan_op, "EAGER_FUNCTION", False)
    kw = make_scan_inputs(**CASES["odd-L-groups"], with_init=True)
    _assert_matches_reference(kw)


def test_unused_final_state_and_output():
    """Gradients through only the final state, or only the output (the other gets no
    gradient at all, not zeros)."""
    kw = make_scan_inputs(**CASES["plain"], with_init=True)
    inputs = {k: v.detach().clone().to(DEVICE).requires_grad_() for k, v in kw.items() if v is not None}
    ref = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    for pick in (0, 1):
        got = _triton(**inputs, delta_softplus=True, return_final_state=True)[pick].float().square().sum()
        exp = selective_scan_ref(**ref, delta_softplus=True, return_final_state=True)[pick].float().square().sum()
        g = torch.autograd.grad(got, list(inputs.values()), allow_unused=True)
        e = torch.autograd.grad(exp, list(ref.values()), allow_unused=True)
        for name, a, b in zip(inputs, g, e):
            if b is None:
                assert a is None or not a.abs().any(), name
            else:
                torch.testing.assert_close(a, b, **FP32, msg=lambda m, name=name: f"d{name}: {m}")


def test_small_steps_are_not_quantized():
    """Δ = softplus(x) for x around -14 (Δ about 1e-6, the steps that let a state hold over
    long gaps). Computed as log(1 + e^x) in fp32, 1 + e^x loses e^x's low bits and Δ comes out
    in units of about 1e-7, several % off; the outputs, tiny sums of Δ B u, then miss the
    reference's by as much. The kernels must match it to 1e-4 relative."""
    kw = make_scan_inputs(batch=1, dim=4, length=40, d_state=4, with_D=False, with_z=False, with_bias=False)
    g = torch.Generator().manual_seed(3)
    kw["delta"] = -14.0 + torch.rand(kw["delta"].shape, generator=g) * 2.0
    args = {k: v.to(DEVICE) for k, v in kw.items() if v is not None}
    y_ref, h_ref = selective_scan_ref(**args, delta_softplus=True, return_final_state=True)
    y, h = _triton(**args, delta_softplus=True, return_final_state=True)
    assert y_ref.abs().max() < 1e-3  # the regime of the test: tiny steps
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-10)


def test_time_offsets_that_would_overflow_32_bits_are_copied_channels_first():
    """The launchers' guard, on meta tensors (strides without memory): a time-major view whose
    t * stride(L) passes 2^31 is made contiguous; one that fits, or a channels-first tensor of
    any length, is passed through. The device test runs the whole scan at such a shape."""
    from mambakit.ops.triton.scan_launch import _bc_operands, _time_safe
    wide = torch.empty(1, 2**20, 2560, device="meta").transpose(1, 2)  # (1, D, L), stride D along L
    fits = torch.empty(1, 2**16, 2560, device="meta").transpose(1, 2)
    long = torch.empty(1, 2560, 2**20, device="meta")
    assert _time_safe(wide).stride(-1) == 1
    assert _time_safe(fits) is fits and _time_safe(long) is long and _time_safe(None) is None
    Bw = torch.empty(1, 2**27 + 2, 16, device="meta").transpose(1, 2)  # (1, N, L), stride N along L
    B, C = _bc_operands(Bw, Bw)
    assert B.stride(-1) == 1 and C.stride(-1) == 1


@pytest.mark.parametrize("segmented", [False, True])
def test_out_may_be_u_itself(segmented):
    """selective_scan(out=u) for inference: y written over u (the kernels read each chunk of u
    before writing it), equal to the reference, in u's own memory. Segmented: the two-pass
    long-sequence path."""
    tuning = dict(scan_seg_below=1000000, scan_min_seg=16) if segmented else {}
    kw = make_scan_inputs(2, 8, 77, 4, with_init=True)
    y_ref = selective_scan_ref(**kw, delta_softplus=True)
    dev = {k: v.to(DEVICE) for k, v in kw.items()}
    u = dev.pop("u").clone()
    ptr = u.data_ptr()
    with torch.no_grad(), knobs.override(**tuning):
        y = selective_scan(u, **dev, delta_softplus=True, backend="triton", out=u)
    assert y is u and u.data_ptr() == ptr
    torch.testing.assert_close(u, y_ref.to(DEVICE), **FP32)


def test_out_is_for_inference_and_must_match_u():
    kw = {k: v.to(DEVICE) for k, v in make_scan_inputs(1, 4, 9, 3).items() if v is not None}
    with pytest.raises(ValueError, match="out must have u's shape, dtype and device"):
        with torch.no_grad():
            selective_scan(**kw, backend="triton", out=torch.empty(1, 4, 8, device=DEVICE))
    u = kw.pop("u").requires_grad_()
    with pytest.raises(ValueError, match="for inference"):
        selective_scan(u, **kw, backend="triton", out=torch.empty_like(u))
    with torch.no_grad():  # the torch path writes the same result into out
        out = torch.empty_like(u)
        y = selective_scan(u, **kw, backend="torch", out=out)
        assert y is out
        torch.testing.assert_close(out, selective_scan(u, **kw, backend="torch"), rtol=0, atol=0)


@pytest.mark.parametrize("length,d_state,varlen,even", [(64, 16, False, True), (45, 16, False, False),
                                                         (64, 12, False, False), (64, 16, True, False)])
def test_forward_drops_its_masks_only_where_every_chunk_is_whole(length, d_state, varlen, even):
    """EVEN (no masks in the lanes forward) only where L is a multiple of the chunk, N fills its
    block and the sequences are dense; the outputs match the reference either way."""
    from mambakit.ops.triton.scan_launch import scan_fwd
    from mambakit.ops.triton.scan_plan import plan_scan
    g = torch.Generator().manual_seed(length + d_state)
    dim = 8
    u, delta = (torch.randn(1, dim, length, generator=g).to(DEVICE) for _ in range(2))
    A = -torch.rand(dim, d_state, generator=g).to(DEVICE) - 0.2
    B, C = (torch.randn(1, d_state, length, generator=g).to(DEVICE) for _ in range(2))
    cu = torch.tensor([0, 20, length], dtype=torch.int32, device=DEVICE) if varlen else None
    assert plan_scan(u, B, A, cu).forward.meta["EVEN"] is even
    y, _, _ = scan_fwd(u, delta * 0.5, A, B, C, None, None, None, None, True, cu, False)
    want = selective_scan_ref(u, delta * 0.5, A, B, C, delta_softplus=True, cu_seqlens=cu)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
