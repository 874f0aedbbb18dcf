"""Vim's padded-path scan on CUDA in Gluon (`triton.experimental.gluon`, Triton >= 3.6), whose
register layouts are explicit. It computes what `scan_fwd` computes for `bimamba_padded` (the
forward scan in place, and the reversed scan with the gate, the forward output added and the
output scale), and is tested against `selective_scan_ref` and the Triton lanes scan.

One warp scans 16 channels of one sequence over every step, a chunk of T = 8 steps at a time;
a channel's 16 states lie on 2 lanes (8 each) and its 8 steps in each lane's registers, so the
chunk's scan needs no shuffles. What it saves over the lanes scan (scan_kernels.py):

- B and C are loaded once a warp as a compact (N, T) tile, widened once, and handed to the
  channel-threads through shared memory (`convert_layout`), where the lanes scan has each of
  16 channel-threads load and widen the same words;
- a channel's output is summed over its 2 lanes by a reduce-scatter (each lane keeps 4 steps),
  so the gate, the add and the store run on 4 steps a lane instead of 8 duplicated;
- SiLU is one MUFU.TANH (sigmoid(x) = (1 + tanh(x/2)) / 2) instead of MUFU.EX2 + MUFU.RCP.

The forward scan loads each chunk's inputs an iteration ahead; the reversed one does not (its
extra registers cost more than the hidden latency; benchmarks/tuning/tune_gluon_scan.py). Gluon has no
interpreter, so this kernel runs on CUDA only; the Triton lanes kernel stays the CPU path."""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@gluon.jit
def _swap_last(y):
    """y with its last axis (of size 2, held in a thread's registers) reversed: a renaming of registers."""
    a, b = gl.split(y)
    return gl.join(b, a)


@gluon.jit
def _flip_steps(x, LAYOUT: gl.constexpr):
    """x (BLOCK_D, 8, N) with its step axis reversed, then in LAYOUT. The step axis is three axes of
    2 steps, each swapped by a split and a join in registers (no instructions where the steps are
    in one thread's registers)."""
    shape: gl.constexpr = x.shape
    y = gl.permute(gl.reshape(x, [shape[0], 2, 2, 2, shape[2]]), [0, 4, 1, 2, 3])  # (D, N, 2, 2, 2)
    y = _swap_last(y)
    y = _swap_last(gl.permute(y, [0, 1, 4, 2, 3]))  # the (2, 2, 2) axes rotated once
    y = _swap_last(gl.permute(y, [0, 1, 4, 2, 3]))  # and twice
    y = gl.permute(y, [0, 1, 4, 2, 3])  # rotated thrice: back to the step bits' order
    return gl.convert_layout(gl.reshape(gl.permute(y, [0, 2, 3, 4, 1]), [shape[0], shape[1], shape[2]]), LAYOUT)


@gluon.jit
def _silu(x):
    """x sigmoid(x) = h + h tanh(h) with h = x / 2: one MUFU.TANH (relative error about 2^-11,
    below the bf16 output's rounding)."""
    h = x * 0.5
    th = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=gl.float32, is_pure=True, pack=1)
    return h + h * th


@gluon.jit
def _gluon_scan_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, add_ptr, out_ptr, L,
                       s_ub, s_ud, s_db, s_dd, s_bb, s_zb, s_zd, s_ob, s_od,
                       BLOCK_D: gl.constexpr, T: gl.constexpr, N: gl.constexpr, BN_STRIDE: gl.constexpr,
                       REVERSE: gl.constexpr, HAS_Z: gl.constexpr, HAS_ADD: gl.constexpr,
                       OUT_SCALE: gl.constexpr, PREFETCH: gl.constexpr):
    """One warp: BLOCK_D = 32 / LANES channels of one sequence, every step; L a multiple of T."""
    LANES: gl.constexpr = 32 // BLOCK_D  # lanes a channel
    # (BLOCK_D, T, N): a thread holds one channel's T steps of N / LANES states
    P: gl.constexpr = gl.BlockedLayout([1, T, N // LANES], [BLOCK_D, 1, LANES], [1, 1, 1], [2, 1, 0])
    L_DT: gl.constexpr = gl.SliceLayout(2, P)  # (BLOCK_D, T), in every lane of a channel
    L_TN: gl.constexpr = gl.SliceLayout(0, P)  # (T, N)
    L_DN: gl.constexpr = gl.SliceLayout(1, P)  # (BLOCK_D, N)
    CB: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [1, 1], [1, 0])  # compact (N, T): 4 steps a thread
    # (BLOCK_D, T) split over a channel's lanes (T / LANES steps each) for the output, and the
    # layout in which a channel's LANES partial outputs are summed into it (reduce-scatter)
    E: gl.constexpr = gl.BlockedLayout([1, T // LANES], [BLOCK_D, LANES], [1, 1], [1, 0])
    R: gl.constexpr = gl.BlockedLayout([1, 1, T // LANES, LANES], [BLOCK_D, LANES, 1, 1], [1, 1, 1, 1], [3, 2, 1, 0])
    b = gl.program_id(0).to(gl.int64)
    d0 = gl.program_id(1) * BLOCK_D
    d = d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, L_DT))
    t = gl.arange(0, T, layout=gl.SliceLayout(0, L_DT))
    d64 = d[:, None].to(gl.int64)
    u_rows = u_ptr + b * s_ub + d64 * s_ud + t[None, :]  # (BLOCK_D, T)
    dt_rows = dt_ptr + b * s_db + d64 * s_dd + t[None, :]
    de = (d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, E)))[:, None].to(gl.int64)
    te = gl.arange(0, T, layout=gl.SliceLayout(0, E))[None, :]
    z_rows = z_ptr + b * s_zb + de * s_zd + te  # (BLOCK_D, T) in E
    o_rows = out_ptr + b * s_ob + de * s_od + te
    a_rows = add_ptr + b * s_ob + de * s_od + te
    dn = d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, L_DN))
    nn = gl.arange(0, N, layout=gl.SliceLayout(0, L_DN))
    A3 = gl.expand_dims(gl.load(A_ptr + dn[:, None] * N + nn[None, :]) * 1.4426950408889634, 1)  # (BLOCK_D, 1, N)
    Dv_lane = gl.load(D_ptr + d)[:, None] * (1.0 / LANES)  # (BLOCK_D, 1): D / LANES
    n_c = gl.arange(0, N, layout=gl.SliceLayout(1, CB))
    t_c = gl.arange(0, T, layout=gl.SliceLayout(0, CB))
    bc_rows = b * s_bb + n_c[:, None] * BN_STRIDE + t_c[None, :]  # (N, T) compact
    t3 = gl.expand_dims(gl.expand_dims(t, 0), 2)  # (1, T, 1)
    n_chunks = L // T
    if REVERSE:
        t_first = L - T
    else:
        t_first = 0
    # the first chunk's scan inputs (PREFETCH: each iteration then loads the next one's)
    u_n = gl.load(u_rows + t_first)
    dt_n = gl.load(dt_rows + t_first)
    B_n = gl.load(B_ptr + bc_rows + t_first)
    C_n = gl.load(C_ptr + bc_rows + t_first)
    h = gl.zeros((BLOCK_D, 1, N), gl.float32, P)
    for c in range(0, n_chunks):
        if REVERSE:
            t0 = t_first - c * T
            t_next = gl.maximum(t0 - T, 0)
        else:
            t0 = c * T
            t_next = gl.minimum(t0 + T, t_first + (n_chunks - 1) * T)
        if PREFETCH:  # this chunk's scan inputs were loaded an iteration ago; load the next one's now
            u_raw, dt_raw, B_raw, C_raw = u_n, dt_n, B_n, C_n
            u_n = gl.load(u_rows + t_next)
            dt_n = gl.load(dt_rows + t_next)
            B_n = gl.load(B_ptr + bc_rows + t_next)
            C_n = gl.load(C_ptr + bc_rows + t_next)
        else:
            u_raw = gl.load(u_rows + t0)
            dt_raw = gl.load(dt_rows + t0)
            B_raw = gl.load(B_ptr + bc_rows + t0)
            C_raw = gl.load(C_ptr + bc_rows + t0)
        # the output to add and the gate, used at the chunk's end, loaded now: their latency hides
        # behind the scan (issued where they are used, they cost the reversed scan 6 %)
        z_raw = dt_raw  # placeholders where absent
        add_raw = dt_raw
        if HAS_Z:
            z_raw = gl.load(z_rows + t0)
        if HAS_ADD:
            add_raw = gl.load(a_rows + t0)
        u = u_raw.to(gl.float32)
        dt = dt_raw.to(gl.float32)
        # B and C widened once a warp, then to every channel-thread through shared memory
        Bt = gl.convert_layout(gl.permute(B_raw.to(gl.float32), [1, 0]), L_TN)  # (T, N)
        Ct = gl.convert_layout(gl.permute(C_raw.to(gl.float32), [1, 0]), L_TN)
        dt3 = gl.expand_dims(dt, 2)  # (BLOCK_D, T, 1)
        dA = gl.exp2(dt3 * A3)  # (BLOCK_D, T, N)
        dBu = gl.expand_dims(dt * u, 2) * gl.expand_dims(Bt, 0)
        if REVERSE:  # the forward scan of the chunk's steps flipped
            dBu = gl.where(t3 == T - 1, dBu + dA * h, dBu)
            _, hs = gl.associative_scan((_flip_steps(dA, P), _flip_steps(dBu, P)), 1, _combine)
            hs = _flip_steps(hs, P)
        else:
            dBu = gl.where(t3 == 0, dBu + dA * h, dBu)
            _, hs = gl.associative_scan((dA, dBu), 1, _combine)
        # y = sum over states of h C + D u: each thread sums its states (and adds D u / LANES, as
        # u is in every lane of the channel), then the channel's LANES partial sums are exchanged so
        # that each lane ends with T / LANES steps of y (E)
        part = gl.sum(gl.reshape(hs * gl.expand_dims(Ct, 0), [BLOCK_D, T, LANES, N // LANES]), axis=3)
        part += gl.convert_layout(gl.expand_dims(Dv_lane * u, 2), part.type.layout)  # (BLOCK_D, T, LANES)
        part = gl.convert_layout(gl.reshape(part, [BLOCK_D, LANES, T // LANES, LANES]), R)
        y = gl.convert_layout(gl.reshape(gl.sum(part, axis=3), [BLOCK_D, T]), E)  # (BLOCK_D, T)
        if HAS_ADD:
            y += add_raw.to(gl.float32)
        if HAS_Z:
            y = y * _silu(z_raw.to(gl.float32))
        if OUT_SCALE != 1.0:
            y = y * OUT_SCALE
        gl.store(o_rows + t0, y.to(out_ptr.dtype.element_ty))
        if REVERSE:
            h = gl.sum(gl.where(t3 == 0, hs, 0.0), axis=1, keep_dims=True)
        else:
            h = gl.sum(gl.where(t3 == T - 1, hs, 0.0), axis=1, keep_dims=True)


def _unfit(u, delta, A, B, C, D, z, add, out) -> str | None:
    """Why `gluon_scan` cannot take these tensors, or None when it can."""
    batch, dim, length = u.shape
    rows = [("u", u), ("delta", delta)] + [(k, v) for k, v in (("z", z), ("add", add), ("out", out)) if v is not None]
    for name, x in rows + [("B", B), ("C", C)]:
        if x.dtype != torch.bfloat16:
            return f"{name} must be bf16, got {x.dtype}"
    for name, x in rows:
        if x.shape != u.shape or x.stride(2) != 1:
            return f"{name} must be (B, D, Lp) = {tuple(u.shape)} with unit stride along Lp"
    if A.shape != (dim, 16) or A.dtype != torch.float32 or not A.is_contiguous():
        return f"A must be contiguous fp32 ({dim}, 16) (d_state 16 only), got {tuple(A.shape)} {A.dtype}"
    if D.shape != (dim,) or D.dtype != torch.float32 or not D.is_contiguous():
        return f"D must be contiguous fp32 ({dim},)"
    if dim % 16 or length % 8:
        return f"D_inner must be a multiple of 16 and Lp of 8, got {dim} and {length}"
    if B.shape != (batch, 16, length) or C.shape != B.shape:
        return f"B and C must be ({batch}, 16, {length}), got {tuple(B.shape)} and {tuple(C.shape)}"
    if B.stride(1) != length or C.stride(1) != length or B.stride(2) != 1 or C.stride(2) != 1 \
            or B.stride(0) != C.stride(0):
        return (f"B and C must have state stride Lp, unit stride along Lp and one batch stride, got "
                f"{B.stride()} and {C.stride()}")
    if not all(x.is_cuda for x in (u, delta, A, B, C, D)):
        return "CUDA tensors only (Gluon has no interpreter)"
    return None


def gluon_fits(u, delta, A, B, C, D, z=None, add=None, out=None) -> bool:
    """Whether `gluon_scan` takes these tensors (see its docstring)."""
    return _unfit(u, delta, A, B, C, D, z, add, out) is None


def gluon_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, z: torch.Tensor | None = None, add: torch.Tensor | None = None,
               out: torch.Tensor | None = None, reverse: bool = False, out_scale: float = 1.0,
               prefetch: bool | None = None, check: bool = True) -> torch.Tensor:
    """y = out_scale * (scan(u) + add) * silu(z), the scan reversed if `reverse`, as `scan_fwd`
    computes it for the padded path, on CUDA. u, delta, z, add, out: (B, D, Lp) bf16 with unit
    stride along Lp (out may be u, or add); A (D, 16) and D (D,) fp32; B and C (B, 16, Lp) bf16
    with state stride Lp and one batch stride (x_proj's (B, R + 32, Lp) output). D a multiple of 16, Lp of 8. `prefetch`
    (load each chunk's inputs an iteration ahead) defaults to the measured faster choice: on for
    the forward scan, off for the reversed one. `check=False` skips the input checks, for a caller
    that has just had `gluon_fits` accept the same tensors."""
    problem = _unfit(u, delta, A, B, C, D, z, add, out) if check else None
    if problem:
        raise ValueError(f"gluon_scan: {problem}")
    out = torch.empty_like(u) if out is None else out
    if check and add is not None and add.stride() != out.stride():
        raise ValueError(f"gluon_scan: add and out must have the same strides, got {add.stride()} and {out.stride()}")
    batch, dim, length = u.shape
    zz = z if z is not None else u
    _gluon_scan_kernel[(batch, dim // 16)](
        u, delta, A, B, C, D, zz, add if add is not None else out, out, length,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), zz.stride(0), zz.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_D=16, T=8, N=16, BN_STRIDE=length, REVERSE=reverse, HAS_Z=z is not None, HAS_ADD=add is not None,
        OUT_SCALE=float(out_scale), PREFETCH=(not reverse) if prefetch is None else prefetch, num_warps=1)
    return out
