"""The "lanes" forward kernel of the selective scan: states across lanes, time in registers.

Where the other layouts scan along a time axis that spans lanes and warps (shuffles and shared
memory at every step), this one gives each thread a short run of T consecutive time steps of one
channel and NR of its states, so that the scan over time is a sequential in-register loop:

    register tile (NL, BLOCK_D, T, NR); state n = n1 * NR + n2
      n1: NL lanes         BLOCK_D: the remaining 32 / NL lanes, times the warps
      T:  in registers     NR: in registers

Triton has no explicit layouts, so the layout is steered through the loads: B and C are loaded
as full 4-D tiles (broadcast over channels) whose contiguous axis is time, T is the width of one
16-byte vector, and the remaining lanes are filled in the order (n1, channel). The sum over
states for y costs NR - 1 in-register adds and log2(NL) shuffles per (channel, step).

Per-(channel, step) work (softplus, Δu, D·u, the SiLU gate) runs on a compact 2-D (BLOCK_D, T)
tile and is broadcast to the 4-D tile, so it is not repeated for each state.

The arguments are those of `selective_scan._fwd_kernel`, so the launcher chooses between them;
`BLOCK_L` is here only the interval at which chunk-start states are saved for the backward
pass (a multiple of T).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .selective_scan import _chunk_row, _combine, _seq_bounds


@triton.jit
def _last(a, b):
    return b


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 on the special-function unit (one MUFU.LG2) when compiled; tl.log2 (a polynomial of
    a dozen FMAs) in the interpreter, which has no inline assembly."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _softplus_fast(x, FAST: tl.constexpr):
    """log(1 + e^x) as ln2 * log2(1 + 2^(x log2 e)): two special-function operations. It is
    computed once per (channel, step) in each of the NL lanes that share them."""
    return tl.where(x <= 20.0, 0.6931471805599453 * _log2(1.0 + tl.exp2(x * 1.4426950408889634), FAST), x)


@triton.jit
def _fwd_kernel_lanes(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, cu_seqlens_ptr,
    out_ptr, final_ptr, chunk_states_ptr, chunk_base_ptr,
    L, dim, d_state, channels_per_group,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_bb, s_bg, s_bn, s_bl, s_ob, s_od, s_ol, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, SAVE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    FAST: tl.constexpr, STAGES: tl.constexpr = 1,
):
    NR: tl.constexpr = BLOCK_N // NL
    CHUNKS_PER_SAVE: tl.constexpr = BLOCK_L // T
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    batch, start, end = _seq_bounds(cu_seqlens_ptr, pid_s, L, VARLEN)
    # 4-D (NL, BLOCK_D, T, NR) indices and 2-D (BLOCK_D, T) ones
    n4 = tl.arange(0, NL)[:, None, None, None] * NR + tl.arange(0, NR)[None, None, None, :]
    d4 = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :, None, None]
    t4 = tl.arange(0, T)[None, None, :, None]
    d2 = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    t2 = tl.arange(0, T)[None, :]
    mask_n4 = n4 < d_state
    m_dn4 = (d4 < dim) & mask_n4
    mask_d2 = d2 < dim
    group = (pid_d * BLOCK_D) // channels_per_group  # BLOCK_D divides channels_per_group
    row_bc = batch.to(tl.int64) * s_bb + group * s_bg
    dn4 = d4 * d_state + n4  # (NL, BLOCK_D, 1, NR) into a (.., D, N) state
    A2 = tl.load(A_ptr + dn4, mask=m_dn4, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d2, mask=mask_d2, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d2, mask=mask_d2, other=0.0).to(tl.float32)
    state_row = pid_s.to(tl.int64) * dim * d_state
    if HAS_INIT:
        h = tl.load(init_ptr + state_row + dn4, mask=m_dn4, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((NL, BLOCK_D, 1, NR), dtype=tl.float32)
    d64 = d2.to(tl.int64)
    u_row = u_ptr + batch.to(tl.int64) * s_ub + d64 * s_ud  # (BLOCK_D, 1)
    dt_row = delta_ptr + batch.to(tl.int64) * s_db + d64 * s_dd
    z_row = z_ptr + batch.to(tl.int64) * s_zb + d64 * s_zd
    out_row = out_ptr + batch.to(tl.int64) * s_ob + d64 * s_od
    # + 0 * d4: B and C are loaded as full 4-D tiles, which fixes the register layout (above)
    B_row = B_ptr + row_bc + n4 * s_bn + 0 * d4  # (NL, BLOCK_D, 1, NR)
    C_row = C_ptr + row_bc + n4 * s_bn + 0 * d4
    for c in tl.range(0, tl.cdiv(end - start, T), num_stages=STAGES):
        t0 = start + c * T
        if SAVE_STATES:
            if c % CHUNKS_PER_SAVE == 0:
                off = _chunk_row(chunk_base_ptr, pid_s, n_chunks_max, c // CHUNKS_PER_SAVE, VARLEN) * dim * d_state
                tl.store(chunk_states_ptr + off + dn4, h, mask=m_dn4)
        # per (channel, step): (BLOCK_D, T)
        tt2 = t0 + t2
        m2 = mask_d2 & (tt2 < end)
        u = tl.load(u_row + tt2 * s_ul, mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(dt_row + tt2 * s_dl, mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt = _softplus_fast(dt, FAST)
        dt = tl.where(m2, dt, 0.0)  # masked steps: exp(0) = 1 and ΔBu = 0 pass the state through
        dtu = dt * u
        # per (state, channel, step): (NL, BLOCK_D, T, NR)
        tt4 = t0 + t4
        m4 = mask_n4 & (tt4 < end)
        Bt = tl.load(B_row + tt4 * s_bl, mask=m4, other=0.0).to(tl.float32)
        Ct = tl.load(C_row + tt4 * s_bl, mask=m4, other=0.0).to(tl.float32)
        dA = tl.exp2(dt[None, :, :, None] * A2)
        dBu = dtu[None, :, :, None] * Bt
        dBu = tl.where(t4 == 0, dBu + dA * h, dBu)  # fold the carried state into the first step
        _, hs = tl.associative_scan((dA, dBu), 2, _combine)  # in registers: T is within a thread
        y = tl.sum(tl.sum(hs * Ct, axis=3), axis=0)  # (BLOCK_D, T)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            zz = tl.load(z_row + tt2 * s_zl, mask=m2, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_row + tt2 * s_ol, y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.reduce(hs, 2, _last, keep_dims=True)  # the state after the chunk's last step
    tl.store(final_ptr + state_row + dn4, h, mask=m_dn4)


def lanes_shape(d_state_block: int, channels_per_group: int, elem_size: int, save_every: int,
                rows: int) -> dict:
    """Block sizes for `_fwd_kernel_lanes`, from the H200 sweep (benchmarks/tune_lanes.py, in
    BENCHMARKS.md). One warp per program. With many (sequence, channel) rows, 8 states per
    thread (fewest shuffles and least repeated per-step work); with few rows, 4 states per
    thread (twice the threads) and a 3-stage software pipeline on the loads, since there are
    too few warps to hide the memory latency otherwise. T is one 16-byte vector of time steps
    (no more than the save interval)."""
    many_rows = rows >= 8192
    states_per_thread = 8 if many_rows else 4
    NL = min(32, max(1, d_state_block // states_per_thread))
    block_d = 32 // NL
    while block_d > 1 and channels_per_group % block_d:
        block_d //= 2
    T = min(max(2, 16 // elem_size), save_every)
    return dict(BLOCK_D=block_d, NL=NL, T=T, num_warps=1, STAGES=1 if many_rows else 3,
                FAST=os.environ.get("TRITON_INTERPRET") != "1")
