"""Long sequences in small batches: the lanes kernels' segments.

With few (sequence, channel) rows, one one-warp program per row leaves most of the GPU idle (at
1 x 131072 on the H200: 1536 rows, 192 programs for 132 SMs, each walking 16384 chunks). Each
sequence is then cut into segments that are scanned in parallel (`scan_plan.segment_plan`):

    forward:  a summary pass scans every segment from a zero state for its local end state
              h_local and its sum of steps, sum(delta) (`fwd_summary_kernel`); the main kernel
              (`scan_fwd_kernel` with SEGMENTED) starts each segment from its true state,
              h <- exp(A sum(delta)) h + h_local folded over the earlier segments.
    backward: a summary pass takes every segment back from a zero adjoint at its end for the
              adjoint that leaves its start (`bwd_summary_kernel`), which needs only delta, C
              and dy, not the states; the main kernel starts each segment from the true adjoint
              at its end, g <- exp(A sum(delta)) g + g_local folded over the later segments.

Segment starts are multiples of 64, so the main loop keeps its vectorised in-thread layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import at_step, chunk_inputs, chunk_states, lanes_setup, reverse_scan


@triton.jit
def fwd_summary_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, seg_h_ptr, seg_dt_ptr,
    L, dim, d_state, channels_per_group, n_segs, seg_len,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bb, s_bg, s_bn, s_bl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    FAST: tl.constexpr, ORDERED: tl.constexpr, STAGES: tl.constexpr = 1,
):
    """Pass 1 of a segmented forward: each segment scanned from a zero state, for its local
    final state h_local (rows, D, N) and its Σ Δ (rows, D). No C, z or output: a few
    instructions per (state, step)."""
    NR: tl.constexpr = BLOCK_N // NL
    (pid_s, seq, seg, pid_d, batch, start, end, n4, d4, t4, d2, t2, mask_n4, m_dn4, mask_d2, dn4, A2, bias, Dv,
     u_row, dt_row, z_row, B_row, C_row, state_row) = lanes_setup(
        u_ptr, A_ptr, bias_ptr, u_ptr, u_ptr, delta_ptr, u_ptr, B_ptr, B_ptr, L, dim, d_state,
        channels_per_group, s_ub, s_ud, s_db, s_dd, 0, 0, s_bb, s_bg, s_bn, n_segs, seg_len,
        HAS_BIAS, False, False, BLOCK_D, BLOCK_N, T, NL, True)
    h = tl.zeros((NL, BLOCK_D, 1, NR), dtype=tl.float32)
    dt_sum = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    for c in tl.range(0, tl.cdiv(end - start, T), num_stages=STAGES):
        m2, u, dt_raw, dt, Bt, Ct, dA, dBu = chunk_inputs(
            u_row, dt_row, B_row, B_row, bias, A2, start + c * T, end, t2, t4, mask_d2, mask_n4, s_ul, s_dl, s_bl,
            HAS_BIAS, SOFTPLUS, FAST)
        h = at_step(chunk_states(dA, dBu, h, t4), t4, T - 1, ORDERED)
        dt_sum += tl.sum(dt, axis=1, keep_dims=True)
    tl.store(seg_h_ptr + pid_s.to(tl.int64) * dim * d_state + dn4, h, mask=m_dn4)
    tl.store(seg_dt_ptr + pid_s.to(tl.int64) * dim + d2, dt_sum, mask=mask_d2)


@triton.jit
def bwd_summary_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, seg_g_ptr, seg_dt_ptr,
    L, dim, d_state, channels_per_group, n_segs, seg_len,
    s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_bb, s_bg, s_bn, s_bl,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
    FAST: tl.constexpr, ORDERED: tl.constexpr, STAGES: tl.constexpr = 1,
):
    """Pass 1 of a segmented backward: each segment taken back from a zero adjoint at its end,
    for the adjoint that flows out of its first step, g_local (rows, D, N), and its Σ Δ (rows,
    D). The adjoint needs only Δ, C and dy (no states): λ_t = exp(Δ_t A) (C_t dy_t + λ_{t+1})."""
    NR: tl.constexpr = BLOCK_N // NL
    (pid_s, seq, seg, pid_d, batch, start, end, n4, d4, t4, d2, t2, mask_n4, m_dn4, mask_d2, dn4, A2, bias, Dv,
     u_row, dt_row, z_row, B_row, C_row, state_row) = lanes_setup(
        delta_ptr, A_ptr, bias_ptr, delta_ptr, delta_ptr, delta_ptr, z_ptr, C_ptr, C_ptr, L, dim, d_state,
        channels_per_group, s_db, s_dd, s_db, s_dd, s_zb, s_zd, s_bb, s_bg, s_bn, n_segs, seg_len,
        HAS_BIAS, False, False, BLOCK_D, BLOCK_N, T, NL, True)
    dout_row = dout_ptr + batch.to(tl.int64) * s_gb + d2.to(tl.int64) * s_gd
    g = tl.zeros((NL, BLOCK_D, 1, NR), dtype=tl.float32)
    dt_sum = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    n_chunks = tl.cdiv(end - start, T)
    for i in tl.range(0, n_chunks, num_stages=STAGES):
        t0 = start + (n_chunks - 1 - i) * T
        m2, u, dt_raw, dt, Ct, Ct, dA, dBu = chunk_inputs(
            dt_row, dt_row, C_row, C_row, bias, A2, t0, end, t2, t4, mask_d2, mask_n4, s_dl, s_dl, s_bl,
            HAS_BIAS, SOFTPLUS, FAST)
        tt2 = t0 + t2
        dy = tl.load(dout_row + tt2 * s_gl, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_row + tt2 * s_zl, mask=m2, other=0.0).to(tl.float32)
            dy = dy * zz * tl.sigmoid(zz)
        x = dy[None, :, :, None] * Ct
        x = tl.where(t4 == T - 1, x + g, x)  # the adjoint from the future enters at the last step
        lam = reverse_scan(dA, dA * x, 2)
        g = at_step(lam, t4, 0, ORDERED)
        dt_sum += tl.sum(dt, axis=1, keep_dims=True)
    tl.store(seg_g_ptr + pid_s.to(tl.int64) * dim * d_state + dn4, g, mask=m_dn4)
    tl.store(seg_dt_ptr + pid_s.to(tl.int64) * dim + d2, dt_sum, mask=mask_d2)
