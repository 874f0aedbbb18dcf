"""The selective scan's kernels, forward and backward, in the "lanes" layout: states across
lanes, time in registers.

Where a layout that scans along a time axis spanning lanes and warps pays shuffles and shared
memory at every step, this one gives each thread a short run of T consecutive time steps of one
channel and NR of its states, so that the scan over time is a sequential in-register loop:

    register tile (NL, BLOCK_D, T, NR); state n = n1 * NR + n2
      n1: NL lanes         BLOCK_D: the remaining 32 / NL lanes, times the warps
      T:  in registers     NR: in registers

Triton has no explicit layouts, so the layout is steered through the loads: B and C are loaded
as full 4-D tiles (broadcast over channels) whose contiguous axis is time, T is the width of one
16-byte vector, and the remaining lanes are filled in the order (n1, channel). The sum over
states for y costs NR - 1 in-register adds and log2(NL) shuffles per (channel, step).

Per-(channel, step) work (softplus, D·u, the SiLU gate) runs on a compact 2-D (BLOCK_D, T)
tile and is broadcast to the 4-D tile, so it is not repeated for each state.

The forward saves the state every BLOCK_L steps (a multiple of T) for the backward pass. The
backward walks the saved segments in reverse, each one or two chunks of T = 8 steps (the save
interval, scan_plan.py). With two, it recomputes the state before the second chunk; then it
runs each chunk's forward scan and its adjoint scan in registers. Reductions over channels (dB,
dC) and over time (dA, dD, dΔ-bias) are written as per-program partial sums and added by torch
in a fixed order: no atomics, so the backward is deterministic.

With few rows and long sequences, the launcher cuts each sequence into segments scanned in
parallel (scan_segments.py); the main kernels then start each segment from its true state
(forward) or adjoint (backward), folded from the segments' summaries (SEGMENTED).

The block sizes and flags come from the launch plan (scan_plan.py); the launchers are in
scan_launch.py. Packed sequences (`cu_seqlens`) map one program row to one sequence; row
offsets are 64-bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import (at_step, chunk_inputs, chunk_loads, chunk_math, chunk_row, chunk_states, lanes_setup, load_steps,
                      reverse_scan, silu, softplus, state_loads, step_loads)


@triton.jit
def _state_words(B_row, C_row, t0, tw4):
    """One chunk's B, C as 32-bit words of two bf16 steps each, (NL, BLOCK_D, T/2, NR): for rows
    with unit stride along time, 4-byte aligned at every chunk (EVEN). Carried round the loop as
    words, they need no repacking before `_widen_words`."""
    Bw = tl.load((B_row + t0).to(tl.pointer_type(tl.int32)) + tw4)
    Cw = tl.load((C_row + t0).to(tl.pointer_type(tl.int32)) + tw4)
    return Bw, Cw


@triton.jit
def _widen_words(w, NL: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, NR: tl.constexpr):
    """(NL, BLOCK_D, T/2, NR) words of two bf16 steps -> (NL, BLOCK_D, T, NR) fp32, steps in order:
    the low half is the earlier step (little-endian), each widened by one shift or one mask."""
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    x = tl.permute(tl.join(lo, hi), (0, 1, 2, 4, 3))  # (NL, BLOCK_D, T/2, 2, NR)
    return tl.reshape(x, (NL, BLOCK_D, T, NR))


@triton.jit
def _chunk_states_reversed(dA, dBu, h, t4, T: tl.constexpr):
    """As `chunk_states` for a scan that runs backward in time (h_t = exp(Δ_t A) h_{t+1} + Δ_t B_t u_t):
    h is the state after the chunk's last step in that order, i.e. from the chunk that follows in time."""
    dBu = tl.where(t4 == T - 1, dBu + dA * h, dBu)  # fold the carried state into the last step
    return reverse_scan(dA, dBu, 2)


@triton.jit
def _segment_decay(seg_dt_ptr, row, dim, d4, A2):
    """exp(A Σ_segment Δ), (NL, BLOCK_D, 1, NR): what a whole segment multiplies a state by."""
    dt_sum = tl.load(seg_dt_ptr + row.to(tl.int64) * dim + d4, mask=d4 < dim, other=0.0)  # (1, BLOCK_D, 1, 1)
    return tl.exp2(dt_sum * A2)


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, cu_seqlens_ptr,
    out_ptr, final_ptr, chunk_states_ptr, chunk_base_ptr,
    L, dim, d_state, channels_per_group,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_bb, s_bg, s_bn, s_bl, s_ob, s_od, s_ol, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, SAVE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    FAST: tl.constexpr, ORDERED: tl.constexpr, STAGES: tl.constexpr = 1,
    seg_h_ptr=None, seg_dt_ptr=None, n_segs=1, seg_len=0, SEGMENTED: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, REVERSE: tl.constexpr = False, EVEN: tl.constexpr = False,
    add_ptr=None, HAS_ADD: tl.constexpr = False, OUT_SCALE: tl.constexpr = 1.0, BN_STRIDE: tl.constexpr = 0,
):
    """The output is OUT_SCALE * (y + D u + add) * SiLU(z), each term where present; `add` is read
    through out's strides before the same chunk of out is written (so it may be out itself).

    PREFETCH: 0, each chunk's inputs loaded where used; 1, loaded into registers a chunk ahead;
    2, the same with B and C as 32-bit words of two bf16 steps (the launcher checks that their
    rows allow it: `scan_plan.bc_words_fit`).

    BN_STRIDE: B and C's stride between states as a compile-time constant (0: the runtime s_bn),
    so that a thread's state rows are one base address plus immediate offsets: the launcher
    passes it where asked to (a fixed layout whose stride does not change between calls).

    If SEGMENTED, each program scans one segment of a sequence, starting from the true
    state at the segment's start: the initial state carried through the earlier segments'
    summaries (`fwd_summary_kernel`), h <- exp(A Σ Δ) h + h_local, in order.

    If REVERSE, the scan runs from the last step down to the first (Vision Mamba's backward
    direction, without flipping its inputs in memory): the same aligned chunks in the opposite
    order, each scanned backward in registers; outputs stay at their own time steps. Steps past
    `end` in the last chunk, scanned first, pass the zero state through. Not with SAVE_STATES,
    SEGMENTED or VARLEN (the launcher checks)."""
    NR: tl.constexpr = BLOCK_N // NL
    CHUNKS_PER_SAVE: tl.constexpr = BLOCK_L // T
    if BN_STRIDE:
        s_bn = BN_STRIDE
    (pid_s, seq, seg, pid_d, batch, start, end, n4, d4, t4, d2, t2, mask_n4, m_dn4, mask_d2, dn4, A2, bias, Dv,
     u_row, dt_row, z_row, B_row, C_row, state_row) = lanes_setup(
        cu_seqlens_ptr, A_ptr, bias_ptr, D_ptr, u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, L, dim, d_state,
        channels_per_group, s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_bb, s_bg, s_bn, n_segs, seg_len,
        HAS_BIAS, HAS_D, VARLEN, BLOCK_D, BLOCK_N, T, NL, SEGMENTED)
    if HAS_INIT:
        h = tl.load(init_ptr + state_row + dn4, mask=m_dn4, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((NL, BLOCK_D, 1, NR), dtype=tl.float32)
    first_save = 0
    if SEGMENTED:
        first_save = seg * (seg_len // BLOCK_L)
        for j in range(0, seg):
            row = seq * n_segs + j
            h_local = tl.load(seg_h_ptr + row.to(tl.int64) * dim * d_state + dn4, mask=m_dn4, other=0.0)
            h = _segment_decay(seg_dt_ptr, row, dim, d4, A2) * h + h_local
    tw4 = tl.arange(0, T // 2)[None, None, :, None]  # words of two steps (PREFETCH 2)
    out_row = out_ptr + batch.to(tl.int64) * s_ob + d2.to(tl.int64) * s_od
    if HAS_ADD:
        add_row = add_ptr + batch.to(tl.int64) * s_ob + d2.to(tl.int64) * s_od
    n_chunks = tl.cdiv(end - start, T)
    t_last = start + (n_chunks - 1) * T
    if REVERSE:
        t_first = t_last
    else:
        t_first = start
    if PREFETCH:  # the first chunk's raw inputs; each step of the loop then loads the next one's
        u_n, dtr_n = step_loads(u_row, dt_row, t_first, end, t2, mask_d2, s_ul, s_dl, EVEN)
        if PREFETCH == 2:
            B_n, C_n = _state_words(B_row, C_row, t_first, tw4)
        else:
            B_n, C_n = state_loads(B_row, C_row, t_first, end, t4, mask_n4, s_bl, EVEN)
        z_n = u_n
        if HAS_Z:
            z_n = load_steps(z_row, t_first + t2, s_zl, mask_d2, end, EVEN)
    for c in tl.range(0, n_chunks, num_stages=STAGES):
        if REVERSE:
            t0 = t_first - c * T
        else:
            t0 = start + c * T
        tt2 = t0 + t2
        m2 = mask_d2 & (tt2 < end)
        if SAVE_STATES:
            if c % CHUNKS_PER_SAVE == 0:
                row = chunk_row(chunk_base_ptr, seq, n_chunks_max, first_save + c // CHUNKS_PER_SAVE, VARLEN)
                tl.store(chunk_states_ptr + row * dim * d_state + dn4, h, mask=m_dn4)
        if PREFETCH:
            # this chunk's inputs were loaded one step ago; the next chunk's loads are issued
            # now, so their latency hides behind this chunk's work (few warps per SM here)
            u_raw, dtr_raw, z_raw = u_n, dtr_n, z_n
            # the next chunk in scan order; after the last one, the last again (a load in bounds, unused)
            if REVERSE:
                t_next = tl.maximum(t0 - T, start)
            else:
                t_next = tl.minimum(t0 + T, t_last)
            if PREFETCH == 2:  # B and C as words: bf16 values carried round the loop one by one
                # sit in 16-bit registers, which cost a PRMT each to pair up again for `widen`
                # (sm_90 SASS, benchmarks/tuning/scan_sass.py: 684 against 582 instructions a chunk)
                B_raw = _widen_words(B_n, NL, BLOCK_D, T, NR)
                C_raw = _widen_words(C_n, NL, BLOCK_D, T, NR)
                B_n, C_n = _state_words(B_row, C_row, t_next, tw4)
            else:
                B_raw, C_raw = B_n, C_n
                B_n, C_n = state_loads(B_row, C_row, t_next, end, t4, mask_n4, s_bl, EVEN)
            u_n, dtr_n = step_loads(u_row, dt_row, t_next, end, t2, mask_d2, s_ul, s_dl, EVEN)
            if HAS_Z:
                z_n = load_steps(z_row, t_next + t2, s_zl, mask_d2, end, EVEN)
        else:
            u_raw, dtr_raw, B_raw, C_raw = chunk_loads(u_row, dt_row, B_row, C_row, t0, end, t2, t4, mask_d2,
                                                        mask_n4, s_ul, s_dl, s_bl, EVEN)
            z_raw = u_raw
            if HAS_Z:
                z_raw = load_steps(z_row, tt2, s_zl, mask_d2, end, EVEN)
        u, dt_raw, dt, Bt, Ct, dA, dBu = chunk_math(u_raw, dtr_raw, B_raw, C_raw, m2, bias, A2, HAS_BIAS,
                                                     SOFTPLUS, FAST, EVEN)
        if REVERSE:
            hs = _chunk_states_reversed(dA, dBu, h, t4, T)  # (NL, BLOCK_D, T, NR)
        else:
            hs = chunk_states(dA, dBu, h, t4)  # (NL, BLOCK_D, T, NR)
        y = tl.sum(tl.sum(hs * Ct, axis=3), axis=0)  # (BLOCK_D, T)
        if HAS_D:
            y += Dv * u
        if HAS_ADD:
            y += load_steps(add_row, tt2, s_ol, mask_d2, end, EVEN).to(tl.float32)
        if HAS_Z:
            y = y * silu(z_raw.to(tl.float32), FAST)
        if OUT_SCALE != 1.0:
            y = y * OUT_SCALE
        if EVEN:
            tl.store(out_row + tt2 * s_ol, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_row + tt2 * s_ol, y.to(out_ptr.dtype.element_ty), mask=m2)
        if REVERSE:
            h = at_step(hs, t4, 0, ORDERED)  # the state after the chunk's first step, scanned last
        else:
            h = at_step(hs, t4, T - 1, ORDERED)  # the state after the chunk's last step
    if SEGMENTED:
        if seg == n_segs - 1:  # a branch, not a scalar folded into the mask (Triton 3.9's interpreter refuses that)
            tl.store(final_ptr + state_row + dn4, h, mask=m_dn4)
    else:
        tl.store(final_ptr + state_row + dn4, h, mask=m_dn4)


@triton.jit
def _bwd_loads(t0, u_row, dt_row, z_row, B_row, C_row, dout_row, end, t2, t4, mask_d2, mask_n4,
               s_ul, s_dl, s_zl, s_gl, s_bl, HAS_Z: tl.constexpr):
    """One backward chunk's raw inputs, in their own dtypes: those of `chunk_loads`, then z,
    dout and Δ's raw input at the next step, dt_next (BLOCK_D, T)."""
    u, dt_raw, Bt, Ct = chunk_loads(u_row, dt_row, B_row, C_row, t0, end, t2, t4, mask_d2, mask_n4, s_ul, s_dl,
                                     s_bl)
    tt2 = t0 + t2
    m2 = mask_d2 & (tt2 < end)
    dout = tl.load(dout_row + tt2 * s_gl, mask=m2, other=0.0)
    zz = dout  # unused without z
    if HAS_Z:
        zz = tl.load(z_row + tt2 * s_zl, mask=m2, other=0.0)
    dt_next = tl.load(dt_row + (tt2 + 1) * s_dl, mask=mask_d2 & (tt2 + 1 < end), other=0.0)
    return u, dt_raw, Bt, Ct, zz, dout, dt_next


@triton.jit
def _chunk_backward(h, carry, t0, u_raw, dtr_raw, B_raw, C_raw, z_raw, dout_raw, dtn_raw, bias, A2, Dv, end,
                    t2, t4, mask_d2,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                    FAST: tl.constexpr, T: tl.constexpr, ORDERED: tl.constexpr):
    """One chunk of the backward pass (its raw inputs from `_bwd_loads`), from the state h before
    it and the adjoint `carry` that flows into its last step from the future. Returns the
    per-(channel, step) gradients, the per-(state, step) sums over this program's channels for
    dB and dC, the per-(channel, state) sum over steps for dA, and the adjoint that flows out of
    its first step."""
    tt2 = t0 + t2
    m2 = mask_d2 & (tt2 < end)
    u, dt_raw, dt, Bt, Ct, dA, dBu = chunk_math(u_raw, dtr_raw, B_raw, C_raw, m2, bias, A2, HAS_BIAS, SOFTPLUS,
                                                 FAST)
    hs = chunk_states(dA, dBu, h, t4)
    dout = dout_raw.to(tl.float32)
    dz = dout  # unused without z
    if HAS_Z:
        zz = z_raw.to(tl.float32)
        sz = tl.sigmoid(zz)
        y = tl.sum(tl.sum(hs * Ct, axis=3), axis=0)
        if HAS_D:
            y += Dv * u
        dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
        dy = dout * zz * sz
    else:
        dy = dout
    dy = tl.where(m2, dy, 0.0)
    # exp(Δ_{t+1} A): the multiplier from the adjoint at t+1 back to t (Δ at the next step)
    m_next = mask_d2 & (tt2 + 1 < end)
    dt_next = dtn_raw.to(tl.float32)
    if HAS_BIAS:
        dt_next += bias
    if SOFTPLUS:
        dt_next = softplus(dt_next, FAST)
    a_next = tl.exp2(tl.where(m_next, dt_next, 0.0)[None, :, :, None] * A2)
    # adjoint G_t = C_t dy_t + exp(Δ_{t+1} A) G_{t+1}: a reverse in-register scan, with the carry
    # folded into the last step
    x = dy[None, :, :, None] * Ct
    x = tl.where(t4 == T - 1, x + carry, x)
    G = reverse_scan(a_next, x, 2)
    carry_out = at_step(dA * G, t4, 0, ORDERED)  # exp(Δ_t0 A) G_t0
    X = G * (hs - dBu)  # G_t exp(Δ_t A) h_{t-1}: the gradient through exp(Δ_t A), times it
    gB = tl.sum(tl.sum(G * Bt, axis=3), axis=0)  # (BLOCK_D, T)
    XA = tl.sum(tl.sum(X * A2, axis=3), axis=0)
    ddt = XA * 0.6931471805599453 + gB * u
    du = gB * dt
    if HAS_D:
        du += Dv * dy
    if SOFTPLUS:
        ddt = ddt * tl.sigmoid(dt_raw)
    ddt = tl.where(m2, ddt, 0.0)
    dA_sum = tl.sum(X * dt[None, :, :, None], axis=2, keep_dims=True)  # (NL, BLOCK_D, 1, NR)
    dB_sum = tl.sum(G * (dt * u)[None, :, :, None], axis=1, keep_dims=True)  # (NL, 1, T, NR)
    dC_sum = tl.sum(hs * dy[None, :, :, None], axis=1, keep_dims=True)
    return m2, du, ddt, dz, tl.sum(dy * u, axis=1, keep_dims=True), dA_sum, dB_sum, dC_sum, carry_out


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_seqlens_ptr, chunk_states_ptr, chunk_base_ptr,
    dout_ptr, dfinal_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dinit_ptr, dpart_ptr, dB_part_ptr, dC_part_ptr,
    L, dim, d_state, channels_per_group, n_dblocks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_ob, s_od, s_ol,
    s_bb, s_bg, s_bn, s_bl, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DFINAL: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    FAST: tl.constexpr, ORDERED: tl.constexpr, STAGES: tl.constexpr = 1,
    seg_g_ptr=None, seg_dt_ptr=None, n_segs=1, seg_len=0, SEGMENTED: tl.constexpr = False,
):
    """Walks the saved states' segments (BLOCK_L = CHUNKS * T steps, CHUNKS 1 or 2) in reverse.
    With two chunks, the state before the segment's second chunk is recomputed from the saved
    one, then the second chunk and the first are taken back; with one, the chunk is taken back
    from the saved state directly (twice the saved states, a sixth less work). Sums over
    channels (dB, dC) go to per-program rows, summed by torch in a fixed order; sums over steps
    (dA, dD, dΔ-bias) stay in registers: no atomics.

    If SEGMENTED, each program takes back one segment of a sequence, starting from the true
    adjoint at the segment's end: the final state's gradient carried back through the later
    segments' summaries (`bwd_summary_kernel`), g <- exp(A Σ Δ) g + g_local, in reverse order."""
    NR: tl.constexpr = BLOCK_N // NL
    CHUNKS: tl.constexpr = BLOCK_L // T
    tl.static_assert(CHUNKS == 1 or CHUNKS == 2)
    (pid_s, seq, seg, pid_d, batch, start, end, n4, d4, t4, d2, t2, mask_n4, m_dn4, mask_d2, dn4, A2, bias, Dv,
     u_row, dt_row, z_row, B_row, C_row, state_row) = lanes_setup(
        cu_seqlens_ptr, A_ptr, bias_ptr, D_ptr, u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, L, dim, d_state,
        channels_per_group, s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_bb, s_bg, s_bn, n_segs, seg_len,
        HAS_BIAS, HAS_D, VARLEN, BLOCK_D, BLOCK_N, T, NL, SEGMENTED)
    d64 = d2.to(tl.int64)
    dout_row = dout_ptr + batch.to(tl.int64) * s_gb + d64 * s_gd
    grad_off = batch.to(tl.int64) * s_ob + d64 * s_od  # du, dΔ, dz: one set of strides
    if HAS_DFINAL:
        carry = tl.load(dfinal_ptr + state_row + dn4, mask=m_dn4, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((NL, BLOCK_D, 1, NR), dtype=tl.float32)
    first_save = 0
    if SEGMENTED:
        first_save = seg * (seg_len // BLOCK_L)
        for i in range(0, n_segs - 1 - seg):
            row = seq * n_segs + (n_segs - 1 - i)
            g_local = tl.load(seg_g_ptr + row.to(tl.int64) * dim * d_state + dn4, mask=m_dn4, other=0.0)
            carry = _segment_decay(seg_dt_ptr, row, dim, d4, A2) * carry + g_local
    dA_acc = tl.zeros((NL, BLOCK_D, 1, NR), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    # partial sums for dB, dC: (B, n_dblocks, N, L); packed sequences cover disjoint t in row 0
    part_row = (batch.to(tl.int64) * n_dblocks + pid_d) * d_state * L
    n_saves = tl.cdiv(end - start, BLOCK_L)
    for i in tl.range(0, n_saves, num_stages=STAGES):
        save = n_saves - 1 - i
        t_save = start + save * BLOCK_L
        row = chunk_row(chunk_base_ptr, seq, n_chunks_max, first_save + save, VARLEN)
        h0 = tl.load(chunk_states_ptr + row * dim * d_state + dn4, mask=m_dn4, other=0.0).to(tl.float32)
        h1 = h0
        if CHUNKS == 2:  # the state before the second chunk: the first chunk's states, recomputed
            m2, u, dt_raw, dt, Bt, Ct, dA, dBu = chunk_inputs(
                u_row, dt_row, B_row, C_row, bias, A2, t_save, end, t2, t4, mask_d2, mask_n4, s_ul, s_dl, s_bl,
                HAS_BIAS, SOFTPLUS, FAST)
            h1 = at_step(chunk_states(dA, dBu, h0, t4), t4, T - 1, ORDERED)
        for k in tl.static_range(CHUNKS):
            t0 = t_save + (CHUNKS - 1 - k) * T
            h_start = h1 if k == 0 else h0
            u_r, dtr_r, B_r, C_r, z_r, g_r, dtn_r = _bwd_loads(
                t0, u_row, dt_row, z_row, B_row, C_row, dout_row, end, t2, t4, mask_d2, mask_n4,
                s_ul, s_dl, s_zl, s_gl, s_bl, HAS_Z)
            m2, du, ddt, dz, dD_t, dA_sum, dB_sum, dC_sum, carry = _chunk_backward(
                h_start, carry, t0, u_r, dtr_r, B_r, C_r, z_r, g_r, dtn_r, bias, A2, Dv, end, t2, t4, mask_d2,
                HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST, T, ORDERED)
            tt2 = t0 + t2
            tl.store(du_ptr + grad_off + tt2 * s_ol, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + grad_off + tt2 * s_ol, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
            if HAS_Z:
                tl.store(dz_ptr + grad_off + tt2 * s_ol, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dA_acc += dA_sum
            dD_acc += dD_t
            dbias_acc += tl.sum(ddt, axis=1, keep_dims=True)
            tt4 = t0 + t4
            m4 = mask_n4 & (tt4 < end)
            nl = part_row + n4 * L + tt4  # (NL, 1, T, NR)
            tl.store(dB_part_ptr + nl, dB_sum, mask=m4)
            tl.store(dC_part_ptr + nl, dC_sum, mask=m4)
    if SEGMENTED:
        if seg == 0:
            tl.store(dinit_ptr + state_row + dn4, carry, mask=m_dn4)
    else:
        tl.store(dinit_ptr + state_row + dn4, carry, mask=m_dn4)
    # one row per program span (sequence or segment): [dA (D, N) | dD (D) | dΔ-bias (D)], summed by torch
    part = pid_s.to(tl.int64) * dim * (d_state + 2)
    tl.store(dpart_ptr + part + dn4, dA_acc, mask=m_dn4)
    tl.store(dpart_ptr + part + dim * d_state + d2, dD_acc, mask=mask_d2)
    tl.store(dpart_ptr + part + dim * (d_state + 1) + d2, dbias_acc, mask=mask_d2)
