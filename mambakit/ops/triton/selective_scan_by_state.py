"""A second layout of the Triton scan kernels: the N states are walked one at a time.

The first kernels (selective_scan.py) scan a (BLOCK_D, BLOCK_L, N) register tile along its
middle axis. The device sweep showed that this scan's cross-lane traffic dominates. Here each
state n gets a 2-D (BLOCK_D, BLOCK_L) tile, scanned along its contiguous time axis, as the
official CUDA kernel does (threads along time, a loop over states). This allows long chunks
(BLOCK_L in the hundreds) at the same register cost. u, Δ, z are loaded once per chunk; the
B and C rows for state n are loaded once per chunk and state.

The arguments and the outputs are exactly those of the first kernels, so the launchers in
selective_scan.py choose between them (`MAMBAKIT_SCAN_KERNEL=by_state`). Both are tested
against the reference. Which is faster must be measured on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .selective_scan import _at, _chunk_row, _combine, _program_setup, _softplus


@triton.jit
def _column(M, offs_n, n):
    return tl.sum(tl.where(offs_n[None, :] == n, M, 0.0), axis=1)  # (BLOCK_D,)


@triton.jit
def _set_column(M, offs_n, n, v):
    return tl.where(offs_n[None, :] == n, v[:, None], M)


@triton.jit
def _load_dt(delta_ptr, bias_ptr, batch, offs_d, t, mask, mask_d, s_db, s_dd, s_dl,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    dt_raw = tl.load(_at(delta_ptr, batch, offs_d, t, s_db, s_dd, s_dl), mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    dt = _softplus(dt_raw, False) if SOFTPLUS else dt_raw
    return dt_raw, tl.where(mask, dt, 0.0)


@triton.jit
def _fwd_kernel_by_state(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, cu_seqlens_ptr,
    out_ptr, final_ptr, chunk_states_ptr, chunk_base_ptr,
    L, dim, d_state, channels_per_group,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_bb, s_bg, s_bn, s_bl, s_ob, s_od, s_ol, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, SAVE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_s, pid_d, batch, start, end, offs_d, offs_n, offs_l, mask_d, mask_n, m_dn, row_bc, dn, A2 = _program_setup(
        cu_seqlens_ptr, A_ptr, L, dim, d_state, channels_per_group, s_bb, s_bg, VARLEN, BLOCK_D, BLOCK_N, BLOCK_L)
    state_row = pid_s.to(tl.int64) * dim * d_state
    if HAS_INIT:
        H = tl.load(init_ptr + state_row + dn, mask=m_dn, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    else:
        H = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    last = (offs_l == BLOCK_L - 1)[None, :]
    for chunk in range(0, tl.cdiv(end - start, BLOCK_L)):
        t = start + chunk * BLOCK_L + offs_l
        mask_t = t < end
        m_dl = mask_d[:, None] & mask_t[None, :]
        if SAVE_STATES:
            off = _chunk_row(chunk_base_ptr, pid_s, n_chunks_max, chunk, VARLEN) * dim * d_state
            tl.store(chunk_states_ptr + off + dn, H, mask=m_dn)
        u = tl.load(_at(u_ptr, batch, offs_d, t, s_ub, s_ud, s_ul), mask=m_dl, other=0.0).to(tl.float32)
        _, dt = _load_dt(delta_ptr, bias_ptr, batch, offs_d, t, m_dl, mask_d, s_db, s_dd, s_dl, HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for n in range(0, d_state):
            a2 = _column(A2, offs_n, n)  # (BLOCK_D,)
            Bn = tl.load(B_ptr + row_bc + n * s_bn + t.to(tl.int64) * s_bl, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_ptr + row_bc + n * s_bn + t.to(tl.int64) * s_bl, mask=mask_t, other=0.0).to(tl.float32)
            a_cum, b_cum = tl.associative_scan((tl.exp2(dt * a2[:, None]), dtu * Bn[None, :]), 1, _combine)
            hs = a_cum * _column(H, offs_n, n)[:, None] + b_cum  # (BLOCK_D, BLOCK_L)
            y += hs * Cn[None, :]
            H = _set_column(H, offs_n, n, tl.sum(tl.where(last, hs, 0.0), axis=1))
        if HAS_D:
            y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None] * u
        if HAS_Z:
            zz = tl.load(_at(z_ptr, batch, offs_d, t, s_zb, s_zd, s_zl), mask=m_dl, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(_at(out_ptr, batch, offs_d, t, s_ob, s_od, s_ol), y.to(out_ptr.dtype.element_ty), mask=m_dl)
    tl.store(final_ptr + state_row + dn, H, mask=m_dn)


@triton.jit
def _bwd_kernel_by_state(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_seqlens_ptr, chunk_states_ptr, chunk_base_ptr,
    dout_ptr, dfinal_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dinit_ptr, dpart_ptr, dB_part_ptr, dC_part_ptr,
    L, dim, d_state, channels_per_group, n_dblocks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_ob, s_od, s_ol,
    s_bb, s_bg, s_bn, s_bl, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DFINAL: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_s, pid_d, batch, start, end, offs_d, offs_n, offs_l, mask_d, mask_n, m_dn, row_bc, dn, A2 = _program_setup(
        cu_seqlens_ptr, A_ptr, L, dim, d_state, channels_per_group, s_bb, s_bg, VARLEN, BLOCK_D, BLOCK_N, BLOCK_L)
    state_row = pid_s.to(tl.int64) * dim * d_state
    if HAS_DFINAL:  # G: dL/dh at the end of the chunk being processed, per state
        G = tl.load(dfinal_ptr + state_row + dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    A_first = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    first = (offs_l == 0)[None, :]
    part_row = (batch.to(tl.int64) * n_dblocks + pid_d) * d_state * L
    n_chunks = tl.cdiv(end - start, BLOCK_L)
    for i in range(0, n_chunks):
        chunk = n_chunks - 1 - i
        t = start + chunk * BLOCK_L + offs_l
        mask_t = t < end
        m_dl = mask_d[:, None] & mask_t[None, :]
        m_next = mask_d[:, None] & ((t + 1) < end)[None, :]
        u = tl.load(_at(u_ptr, batch, offs_d, t, s_ub, s_ud, s_ul), mask=m_dl, other=0.0).to(tl.float32)
        dt_raw, dt = _load_dt(delta_ptr, bias_ptr, batch, offs_d, t, m_dl, mask_d, s_db, s_dd, s_dl, HAS_BIAS,
                              SOFTPLUS)
        _, dt_next = _load_dt(delta_ptr, bias_ptr, batch, offs_d, t + 1, m_next, mask_d, s_db, s_dd, s_dl,
                              HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        dy = tl.load(_at(dout_ptr, batch, offs_d, t, s_gb, s_gd, s_gl), mask=m_dl, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(_at(z_ptr, batch, offs_d, t, s_zb, s_zd, s_zl), mask=m_dl, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zz)
            dout_raw = dy
            dy = dy * zz * sz
        dy = tl.where(m_dl, dy, 0.0)
        off = _chunk_row(chunk_base_ptr, pid_s, n_chunks_max, chunk, VARLEN) * dim * d_state
        H0 = tl.load(chunk_states_ptr + off + dn, mask=m_dn, other=0.0)
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        du = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        ddt = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for n in range(0, d_state):
            a2 = _column(A2, offs_n, n)
            Bn = tl.load(B_ptr + row_bc + n * s_bn + t.to(tl.int64) * s_bl, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_ptr + row_bc + n * s_bn + t.to(tl.int64) * s_bl, mask=mask_t, other=0.0).to(tl.float32)
            dA = tl.exp2(dt * a2[:, None])
            dBu = dtu * Bn[None, :]
            a_cum, b_cum = tl.associative_scan((dA, dBu), 1, _combine)
            hs = a_cum * _column(H0, offs_n, n)[:, None] + b_cum
            y += hs * Cn[None, :]
            # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, reverse scan plus the carried G
            p_cum, g_part = tl.associative_scan((tl.exp2(dt_next * a2[:, None]), dy * Cn[None, :]), 1, _combine,
                                                reverse=True)
            g = g_part + p_cum * _column(G, offs_n, n)[:, None]
            G = _set_column(G, offs_n, n, tl.sum(tl.where(first, g, 0.0), axis=1))
            A_first = _set_column(A_first, offs_n, n, tl.sum(tl.where(first, dA, 0.0), axis=1))
            X = g * (hs - dBu)  # g_t a_t h_{t-1}
            gB = g * Bn[None, :]
            ddt += X * (a2 * 0.6931471805599453)[:, None] + gB * u
            du += gB * dt
            dA_acc = _set_column(dA_acc, offs_n, n, _column(dA_acc, offs_n, n) + tl.sum(X * dt, axis=1))
            # partial sums over this program's channels
            tl.store(dB_part_ptr + part_row + n * L + t, tl.sum(g * dtu, axis=0), mask=mask_t)
            tl.store(dC_part_ptr + part_row + n * L + t, tl.sum(hs * dy[:, :], axis=0), mask=mask_t)
        if HAS_D:
            y += Dv[:, None] * u
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            dz = dout_raw * y * sz * (1.0 + zz * (1.0 - sz))
            tl.store(_at(dz_ptr, batch, offs_d, t, s_ob, s_od, s_ol), dz.to(dz_ptr.dtype.element_ty), mask=m_dl)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(m_dl, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(_at(du_ptr, batch, offs_d, t, s_ob, s_od, s_ol), du.to(du_ptr.dtype.element_ty), mask=m_dl)
        tl.store(_at(ddelta_ptr, batch, offs_d, t, s_ob, s_od, s_ol), ddt.to(ddelta_ptr.dtype.element_ty), mask=m_dl)
    tl.store(dinit_ptr + state_row + dn, G * A_first, mask=m_dn)
    sum_row = pid_s.to(tl.int64) * dim * (d_state + 2)  # [dA (D, N) | dD (D) | dΔ-bias (D)], summed by torch
    tl.store(dpart_ptr + sum_row + dn, dA_acc, mask=m_dn)
    tl.store(dpart_ptr + sum_row + dim * d_state + offs_d, dD_acc, mask=mask_d)
    tl.store(dpart_ptr + sum_row + dim * (d_state + 1) + offs_d, dbias_acc, mask=mask_d)
