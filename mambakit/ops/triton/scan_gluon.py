"""WIP (compiled offline for sm_90, not yet run on a GPU): Vim's padded-path scan in Gluon.

The lanes scan (selective_scan_lanes.py) at Vim's tile has each of a warp's 16 channel-threads
load and widen the same B and C words: about 128 of its 573 SASS instructions a chunk of 8 steps
x 8 states. Triton 3.6's language gives no way to hand a tile from a compact load to another
register layout through shared memory without re-laying out the whole chunk (offline: 1,015+
instructions). Gluon (`triton.experimental.gluon`) takes the layouts explicitly: here B and C
are loaded once a warp as a compact (N, T) tile (4 steps a thread), widened once, and moved to
the compute layout with `convert_layout` (STSM + LDS). Offline for sm_90 (`python -m
mambakit.ops.triton.scan_gluon`): the forward's loop with this staging is 470 instructions a
chunk at 128 registers without prefetch.

Gluon has no interpreter, so this path is GPU-only; the Triton lanes kernel stays the CPU and
reference-checked path. To do before it can be used: run `tests` on the GPU against the
reference, time it against scan_fwd at Vim's shape, and wire it into bimamba_padded behind
a measured default."""

from __future__ import annotations

import torch
import triton.language as tl
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
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe instead of the special-function unit: x = j + f with j an
    integer and |f| <= 1/2 (rounding by adding 1.5 * 2^23), 2^f by a degree-5 polynomial (relative
    error 2.3e-7 in fp32, as MUFU.EX2's), 2^j added into the exponent bits. x is clamped at -125,
    whose 2^x is below every decay a scan can tell from 0."""
    x = gl.maximum(x, -125.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = 0.001327645848505199 * f + 0.009675541892647743
    p = p * f + 0.05550713464617729
    p = p * f + 0.24022120237350464
    p = p * f + 0.6931469440460205
    p = p * f + 1.0000001192092896
    bits = p.to(gl.int32, bitcast=True) + (t.to(gl.int32, bitcast=True) << 23)
    return bits.to(gl.float32, bitcast=True)


@gluon.jit
def _exp2_mixed(x, LAYOUT: gl.constexpr, EMU: gl.constexpr):
    """2^x for x (BLOCK_D, T, N) with 1 / 2^EMU of each thread's states on the FMA pipe (_exp2_fma)
    and the rest on MUFU.EX2, to balance the two pipes; EMU 0 is MUFU alone."""
    if EMU == 0:
        return gl.exp2(x)
    else:
        shape: gl.constexpr = x.shape
        a, b = gl.split(gl.reshape(x, [shape[0], shape[1], shape[2] // 2, 2]))  # a thread's states in pairs
        if EMU == 1:
            b = _exp2_fma(b)
        else:
            b1, b2 = gl.split(gl.reshape(b, [shape[0], shape[1], shape[2] // 4, 2]))
            if EMU == 2:
                b2 = _exp2_fma(b2)
            else:
                c1, c2 = gl.split(gl.reshape(b2, [shape[0], shape[1], shape[2] // 8, 2]))
                b2 = gl.convert_layout(gl.reshape(gl.join(gl.exp2(c1), _exp2_fma(c2)), [shape[0], shape[1], shape[2] // 4]),
                                       b1.type.layout)
            b = gl.convert_layout(gl.reshape(gl.join(gl.exp2(b1), b2), [shape[0], shape[1], shape[2] // 2]), a.type.layout)
        return gl.convert_layout(gl.reshape(gl.join(gl.exp2(a), b), shape), LAYOUT)


@gluon.jit
def _gluon_scan_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, add_ptr, out_ptr, L,
                       s_ub, s_ud, s_db, s_dd, s_bb, s_zb, s_zd, s_ob, s_od,
                       BLOCK_D: gl.constexpr, T: gl.constexpr, N: gl.constexpr, BN_STRIDE: gl.constexpr,
                       REVERSE: gl.constexpr, HAS_Z: gl.constexpr, HAS_ADD: gl.constexpr,
                       OUT_SCALE: gl.constexpr, PREFETCH: gl.constexpr, PREFETCH_EPI: gl.constexpr,
                       UNROLL: gl.constexpr,
                       SPLIT_OUT: gl.constexpr, EMU: gl.constexpr):
    """One warp: BLOCK_D = 32 / LANES channels of one sequence, every step; L a multiple of T, N = 16."""
    LANES: gl.constexpr = 32 // BLOCK_D  # lanes a channel
    # (BLOCK_D, T, N): a thread holds one channel's T steps of N / LANES states
    P: gl.constexpr = gl.BlockedLayout([1, T, N // LANES], [BLOCK_D, 1, LANES], [1, 1, 1], [2, 1, 0])
    L_DT: gl.constexpr = gl.SliceLayout(2, P)  # (BLOCK_D, T)
    L_TN: gl.constexpr = gl.SliceLayout(0, P)  # (T, N)
    L_DN: gl.constexpr = gl.SliceLayout(1, P)  # (BLOCK_D, N)
    CB: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [1, 1], [1, 0])  # compact (N, T): 4 steps a thread
    # (BLOCK_D, T) split over a channel's lanes (T / LANES steps each) for the output's epilogue, and
    # the layout that sums a channel's LANES partial outputs into it (reduce-scatter)
    if SPLIT_OUT:
        E: gl.constexpr = gl.BlockedLayout([1, T // LANES], [BLOCK_D, LANES], [1, 1], [1, 0])
    else:  # the output with the channel's steps in every one of its lanes, as the scan leaves it
        E: gl.constexpr = L_DT
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
    z_rows = z_ptr + b * s_zb + de * s_zd + te
    o_rows = out_ptr + b * s_ob + de * s_od + te
    a_rows = add_ptr + b * s_ob + de * s_od + te
    dn = d0 + gl.arange(0, BLOCK_D, layout=gl.SliceLayout(1, L_DN))
    nn = gl.arange(0, N, layout=gl.SliceLayout(0, L_DN))
    A3 = gl.expand_dims(gl.load(A_ptr + dn[:, None] * N + nn[None, :]) * 1.4426950408889634, 1)  # (BLOCK_D, 1, N)
    Dv = gl.load(D_ptr + d)[:, None]  # (BLOCK_D, 1)
    Dv_lane = Dv * (1.0 / LANES)
    n_c = gl.arange(0, N, layout=gl.SliceLayout(1, CB))
    t_c = gl.arange(0, T, layout=gl.SliceLayout(0, CB))
    bc_rows = b * s_bb + n_c[:, None] * BN_STRIDE + t_c[None, :]  # (N, T) compact
    t3 = gl.expand_dims(gl.expand_dims(t, 0), 2)  # (1, T, 1)
    n_chunks = L // T
    if REVERSE:
        t_first = L - T
    else:
        t_first = 0
    # the first chunk's raw inputs; each iteration then loads the next one's (a chunk ahead)
    u_n = gl.load(u_rows + t_first)
    dt_n = gl.load(dt_rows + t_first)
    B_n = gl.load(B_ptr + bc_rows + t_first)
    C_n = gl.load(C_ptr + bc_rows + t_first)
    z_n = dt_n  # the gate and the output to add (or placeholders)
    add_n = dt_n
    if PREFETCH_EPI:
        if HAS_Z:
            z_n = gl.load(z_rows + t_first)
        if HAS_ADD:
            add_n = gl.load(a_rows + t_first)
    h = gl.zeros((BLOCK_D, 1, N), gl.float32, P)
    for c in tl.range(0, n_chunks, loop_unroll_factor=UNROLL):
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
        # the gate and the output to add are first used at the chunk's end: loaded in the iteration,
        # their latency hides behind the scan (PREFETCH_EPI: an iteration ahead too)
        z_raw, add_raw = z_n, add_n
        if PREFETCH_EPI:
            if HAS_Z:
                z_n = gl.load(z_rows + t_next)
            if HAS_ADD:
                add_n = gl.load(a_rows + t_next)
        else:
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
        dA = _exp2_mixed(dt3 * A3, P, EMU)  # (BLOCK_D, T, N)
        dBu = gl.expand_dims(dt * u, 2) * gl.expand_dims(Bt, 0)
        if REVERSE:  # the forward scan of the chunk's steps flipped (a reversed scan emits shuffles)
            dBu = gl.where(t3 == T - 1, dBu + dA * h, dBu)
            _, hs = gl.associative_scan((_flip_steps(dA, P), _flip_steps(dBu, P)), 1, _combine)
            hs = _flip_steps(hs, P)
        else:
            dBu = gl.where(t3 == 0, dBu + dA * h, dBu)
            _, hs = gl.associative_scan((dA, dBu), 1, _combine)
        # y = sum over states of h C: each thread's states summed, then the channel's LANES partial
        # sums exchanged so that each lane ends with T / LANES steps (E)
        if SPLIT_OUT:
            # (D u is in every lane of the channel: each adds D u / LANES to its partial sum)
            part = gl.sum(gl.reshape(hs * gl.expand_dims(Ct, 0), [BLOCK_D, T, LANES, N // LANES]), axis=3)
            part += gl.convert_layout(gl.expand_dims(Dv_lane * u, 2), part.type.layout)  # (BLOCK_D, T, LANES)
            part = gl.convert_layout(gl.reshape(part, [BLOCK_D, LANES, T // LANES, LANES]), R)
            y = gl.convert_layout(gl.reshape(gl.sum(part, axis=3), [BLOCK_D, T]), E)  # (BLOCK_D, T)
        else:
            y = gl.sum(hs * gl.expand_dims(Ct, 0), axis=2) + Dv * u  # (BLOCK_D, T)
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


def gluon_fits(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether `gluon_scan` takes these: bf16, d_state 16, D a multiple of 16, Lp of 8, B and C rows
    Lp apart in one buffer, unit stride along time."""
    batch, dim, length = u.shape
    return (u.dtype == torch.bfloat16 and B.dtype == torch.bfloat16 and B.shape == (batch, 16, length)
            and C.shape == B.shape and dim % 16 == 0 and length % 8 == 0 and B.stride(1) == length
            and C.stride(1) == length and B.stride(0) == C.stride(0) and u.stride(2) == 1)


def gluon_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, z: torch.Tensor | None = None, add: torch.Tensor | None = None,
               out: torch.Tensor | None = None, reverse: bool = False, out_scale: float = 1.0,
               prefetch: bool = True, prefetch_epi: bool = False, maxnreg: int | None = None, block_d: int = 16,
               unroll: int = 1, split_out: bool | None = None, emu: int = 0) -> torch.Tensor:
    """The padded path's scan (`scan_fwd` as bimamba_padded calls it) on CUDA: u, delta, z, add,
    out (B, D, Lp) bf16 with unit stride along Lp; A (D, 16) and D (D,) fp32; B and C (B, 16, Lp)
    bf16 views of one (B, 32, Lp) buffer (state stride Lp). Lp a multiple of 8, D of 16."""
    batch, dim, length = u.shape
    if A.shape != (dim, 16) or B.shape != (batch, 16, length) or C.shape != B.shape or dim % 16 or length % 8:
        raise ValueError("gluon_scan: Vim's padded shapes only (d_state 16, D a multiple of 16, Lp of 8)")
    if B.stride(1) != length or C.stride(1) != length or B.stride(0) != C.stride(0):
        raise ValueError("gluon_scan: B and C must be rows Lp apart of one buffer")
    out = torch.empty_like(u) if out is None else out
    _gluon_scan_kernel[(batch, dim // block_d)](
        u, delta, A, B, C, D, z if z is not None else u, add if add is not None else out, out, length,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0),
        (z if z is not None else u).stride(0), (z if z is not None else u).stride(1), out.stride(0), out.stride(1),
        BLOCK_D=block_d, T=8, N=16, BN_STRIDE=length, REVERSE=reverse, HAS_Z=z is not None, HAS_ADD=add is not None,
        OUT_SCALE=float(out_scale), PREFETCH=prefetch, PREFETCH_EPI=prefetch_epi, UNROLL=unroll,
        SPLIT_OUT=(z is not None) if split_out is None else split_out, EMU=emu, num_warps=1,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return out
