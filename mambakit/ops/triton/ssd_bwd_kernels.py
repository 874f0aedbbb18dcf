"""The backward kernels of the chunked Mamba-2 (SSD) scan; ssd_op.py launches them after
chunk_state_kernel (ssd_fwd_kernels.py) has summed each chunk's gradient of its start state
from the output, dh_c += sum_t exp(cs_t) dy_t ⊗ C_t.

With u_s = dt_s x_s, the forward is y_t = exp(cs_t) C_t · h_c + sum_{s<=t} CB_ts exp(cs_t - cs_s) u_s
and h_{c+1} = exp(cs_end) h_c + sum_s exp(cs_end - cs_s) u_s ⊗ B_s. The kernels here:
  1. `state_passing_bwd_kernel`: the chunks in reverse, carrying the gradient of the state:
     g_c = dh_c(from y) + exp(cs_end) g_{c+1}. Each chunk's slot gets g_{c+1} (the gradient of its
     contribution); the decay's gradient exp(cs_end) <g_{c+1}, h_c> goes to cs_end; g_0 is the
     initial state's gradient;
  2. `dx_kernel`: per block of source steps s, du_s, then dx_s = dt_s du_s + D dy_s and
     ddt_s = <x_s, du_s>, dB_s (summed over the heads of a group), and the gradient of cs_s;
  3. `dc_kernel`: per block of target steps t, dC_t (summed over the heads of a group) and the
     gradient of cs_t, added to what dx_kernel wrote.
The caller adds the cs_end gradients to each chunk's last step and lets autograd carry the
gradient of cs (an in-chunk cumsum of dt·A) to dt and A."""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import chunk_group


@triton.jit
def state_passing_bwd_kernel(DSTATES, STATES, CS, DFINAL, DINIT, DCS_END, T, n_chunks, H, PN,
                             HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, BLOCK: tl.constexpr,
                             GROUP: tl.constexpr):
    # grid (batch * H, cdiv(P * N, BLOCK)); DSTATES: (batch, c, H, P * N) fp32, in: dh_c from y,
    # out: the gradient of chunk c's contribution; STATES: each chunk's start state; DCS_END (batch, H, c).
    # The chunks go GROUP at a time from the last, their loads issued a group ahead (as the forward)
    pid, pid_e = tl.program_id(0), tl.program_id(1)
    h = pid % H
    b = pid // H
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PN
    rows = tl.arange(0, GROUP)  # row r of a group is chunk c_hi - r
    if HAS_DFINAL:
        grad = tl.load(DFINAL + (b * H + h) * PN + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((BLOCK,), dtype=tl.float32)
    grads = DSTATES + (b * n_chunks * H + h) * PN + offs[None, :]  # + chunk * H * PN
    starts = STATES + (b * n_chunks * H + h) * PN + offs[None, :]
    totals = CS + (b * H + h) * n_chunks * T + T - 1  # + chunk * T
    last = n_chunks - 1
    from_y, log_decay = chunk_group(grads, totals, last - rows, ok, n_chunks, H * PN, T)
    start, _ = chunk_group(starts, totals, last - rows, ok, n_chunks, H * PN, T)
    for i0 in range(0, n_chunks, GROUP):
        chunk = last - i0 - rows
        from_y_next, log_decay_next = chunk_group(grads, totals, chunk - GROUP, ok, n_chunks, H * PN, T)
        start_next, _ = chunk_group(starts, totals, chunk - GROUP, ok, n_chunks, H * PN, T)
        slot = tl.zeros((GROUP, BLOCK), dtype=tl.float32)
        d_log_decay = tl.zeros((GROUP,), dtype=tl.float32)
        for r in tl.static_range(GROUP):  # before the first chunk: nothing from y and decay 1
            row = rows[:, None] == r
            decay = tl.exp(tl.sum(tl.where(rows == r, log_decay, 0.0), axis=0))
            slot = tl.where(row, grad[None, :], slot)
            d_log_decay += tl.where(rows == r, decay * tl.sum(grad * tl.sum(tl.where(row, start, 0.0), axis=0)), 0.0)
            grad = decay * grad + tl.sum(tl.where(row, from_y, 0.0), axis=0)
        inside = chunk >= 0
        tl.store(grads + chunk[:, None] * (H * PN), slot, mask=inside[:, None] & ok[None, :])
        tl.atomic_add(DCS_END + (b * H + h) * n_chunks + chunk, d_log_decay, mask=inside)
        from_y, log_decay, start = from_y_next, log_decay_next, start_next
    if HAS_DINIT:
        tl.store(DINIT + (b * H + h) * PN + offs, grad, mask=ok)


@triton.jit
def _group_program(n_chunks, H, G, heads_per_program):
    """(batch, chunk, group, split) of a dx / dc program: axis 0 runs over batch x c x G x splits,
    each split being heads_per_program consecutive heads of the group."""
    pid = tl.program_id(0)
    splits = (H // G) // heads_per_program
    return pid // (splits * G * n_chunks), (pid // (splits * G)) % n_chunks, (pid // splits) % G, pid % splits


@triton.jit
def dx_kernel(X, DT, CS, CB, DSTATES, B, C, D, DY, DX, DDT, DB, DCS, DCS_END, DD,
              L, T, n_chunks, H, G, P, N, heads_per_program, s_dbsplit,
              s_xb, s_xl, s_xh, s_bb, s_bl, s_bg, s_cb, s_cl, s_cg, s_yb, s_yl, s_yh, s_dxb, s_dxl, s_dxh,
              HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, WANT_DD: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    # grid (batch * c * G * splits, cdiv(T, BLOCK_S)); each program runs heads_per_program heads of
    # one group. DX (batch, L, H, P); DDT (batch, L, H) fp32; DB (splits, batch, L, G, N) fp32;
    # DCS (batch, H, c, T) fp32 (written here); DCS_END (batch, H, c) and DD (H,) or (H, P) fp32 (added to)
    pid_s = tl.program_id(1)
    b, c, g, split = _group_program(n_chunks, H, G, heads_per_program)
    if c * T + pid_s * BLOCK_S >= L:
        return  # sources past L: nothing to write (DCS stays 0 there)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pos_s = c * T + offs_s
    ok_s = (offs_s < T) & (pos_s < L)
    ok_p, ok_n = offs_p < P, offs_n < N
    b_s = tl.load(B + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + offs_n[None, :],
                  mask=ok_s[:, None] & ok_n[None, :], other=0.0)  # (BLOCK_S, BLOCK_N)
    cb_cols = CB + ((b * n_chunks + c) * G + g) * T * T + offs_s[None, :]
    db = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    for i in range(heads_per_program):
        h = g * (H // G) + split * heads_per_program + i
        cs_row = CS + ((b * H + h) * n_chunks + c) * T
        cs_s = tl.load(cs_row + offs_s, mask=ok_s, other=0.0)
        cs_end = tl.load(cs_row + T - 1)
        dt_s = tl.load(DT + (b * L + pos_s) * H + h, mask=ok_s, other=0.0)
        x_s = tl.load(X + b * s_xb + h * s_xh + pos_s[:, None] * s_xl + offs_p[None, :],
                      mask=ok_s[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_S, BLOCK_P)

        # through the chunk's contribution to the state at its end
        dstate = tl.load(DSTATES + ((b * n_chunks + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                         mask=ok_p[:, None] & ok_n[None, :], other=0.0)  # (BLOCK_P, BLOCK_N) fp32
        to_end = tl.where(ok_s, tl.exp(cs_end - cs_s), 0.0)
        du = tl.dot(b_s, tl.trans(dstate.to(b_s.dtype)), input_precision=PRECISION) * to_end[:, None]
        x_dstate = tl.dot(x_s, dstate.to(x_s.dtype), input_precision=PRECISION)  # (BLOCK_S, BLOCK_N)
        db += x_dstate * (to_end * dt_s)[:, None]
        via_state = tl.sum(x_dstate * b_s.to(tl.float32), axis=1) * to_end * dt_s  # (BLOCK_S,)
        dcs_s = -via_state
        tl.atomic_add(DCS_END + (b * H + h) * n_chunks + c, tl.sum(via_state, axis=0))

        # within the chunk, over the targets t >= s
        for t0 in range(pid_s * BLOCK_S, tl.minimum(T, L - c * T), BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            pos_t = c * T + offs_t
            ok_t = (offs_t < T) & (pos_t < L)
            cs_t = tl.load(cs_row + offs_t, mask=ok_t, other=0.0)
            inside = (offs_t[:, None] >= offs_s[None, :]) & ok_t[:, None] & ok_s[None, :]
            decay = tl.exp(tl.where(inside, cs_t[:, None] - cs_s[None, :], float("-inf")))  # (BLOCK_T, BLOCK_S)
            cb = tl.load(cb_cols + offs_t[:, None] * T, mask=inside, other=0.0)
            dy_t = tl.load(DY + b * s_yb + h * s_yh + pos_t[:, None] * s_yl + offs_p[None, :],
                           mask=ok_t[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_T, BLOCK_P)
            c_t = tl.load(C + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + offs_n[None, :],
                          mask=ok_t[:, None] & ok_n[None, :], other=0.0)  # (BLOCK_T, BLOCK_N)
            weight = cb * decay
            du += tl.dot(tl.trans(weight.to(dy_t.dtype)), dy_t, input_precision=PRECISION)
            d_weight = tl.dot(dy_t, tl.trans(x_s), input_precision=PRECISION) * dt_s[None, :] * decay
            db += tl.dot(tl.trans(d_weight.to(c_t.dtype)), c_t, input_precision=PRECISION)
            dcs_s -= tl.sum(d_weight * cb, axis=0)

        dy_s = tl.load(DY + b * s_yb + h * s_yh + pos_s[:, None] * s_yl + offs_p[None, :],
                       mask=ok_s[:, None] & ok_p[None, :], other=0.0).to(tl.float32)
        x32 = x_s.to(tl.float32)
        dx = du * dt_s[:, None]
        if HAS_D:
            if D_PER_CHANNEL:
                dx += tl.load(D + h * P + offs_p, mask=ok_p, other=0.0).to(tl.float32)[None, :] * dy_s
            else:
                dx += tl.load(D + h).to(tl.float32) * dy_s
            if WANT_DD:
                dy_x = tl.sum(dy_s * x32, axis=0)  # (BLOCK_P,)
                if D_PER_CHANNEL:
                    tl.atomic_add(DD + h * P + offs_p, dy_x, mask=ok_p)
                else:
                    tl.atomic_add(DD + h, tl.sum(dy_x, axis=0))
        tl.store(DX + b * s_dxb + h * s_dxh + pos_s[:, None] * s_dxl + offs_p[None, :], dx.to(DX.dtype.element_ty),
                 mask=ok_s[:, None] & ok_p[None, :])
        tl.store(DDT + (b * L + pos_s) * H + h, tl.sum(du * x32, axis=1), mask=ok_s)
        tl.store(DCS + ((b * H + h) * n_chunks + c) * T + offs_s, dcs_s, mask=ok_s)
    db_rows = DB + split * s_dbsplit + ((b * L + pos_s[:, None]) * G + g) * N + offs_n[None, :]
    tl.store(db_rows, db, mask=ok_s[:, None] & ok_n[None, :])


@triton.jit
def dc_kernel(X, DT, CS, CB, STATES, B, C, DY, DC, DCS,
              L, T, n_chunks, H, G, P, N, heads_per_program, s_dcsplit,
              s_xb, s_xl, s_xh, s_bb, s_bl, s_bg, s_cb, s_cl, s_cg, s_yb, s_yl, s_yh,
              BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    # grid (batch * c * G * splits, cdiv(T, BLOCK_T)); DC (splits, batch, L, G, N) fp32;
    # DCS (batch, H, c, T) fp32: the gradient of cs_t is added to what dx_kernel stored
    pid_t = tl.program_id(1)
    b, c, g, split = _group_program(n_chunks, H, G, heads_per_program)
    if c * T + pid_t * BLOCK_T >= L:
        return  # targets past L: nothing to write
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pos_t = c * T + offs_t
    ok_t = (offs_t < T) & (pos_t < L)
    ok_p, ok_n = offs_p < P, offs_n < N
    c_t = tl.load(C + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + offs_n[None, :],
                  mask=ok_t[:, None] & ok_n[None, :], other=0.0)  # (BLOCK_T, BLOCK_N)
    cb_rows = CB + ((b * n_chunks + c) * G + g) * T * T + offs_t[:, None] * T
    s_end = tl.minimum((pid_t + 1) * BLOCK_T, T)
    dc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for i in range(heads_per_program):
        h = g * (H // G) + split * heads_per_program + i
        cs_row = CS + ((b * H + h) * n_chunks + c) * T
        cs_t = tl.load(cs_row + offs_t, mask=ok_t, other=0.0)
        dy_t = tl.load(DY + b * s_yb + h * s_yh + pos_t[:, None] * s_yl + offs_p[None, :],
                       mask=ok_t[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_T, BLOCK_P)

        # through the state the chunk starts from: y_t += exp(cs_t) C_t · h_start
        start = tl.load(STATES + ((b * n_chunks + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                        mask=ok_p[:, None] & ok_n[None, :], other=0.0)  # (BLOCK_P, BLOCK_N) fp32
        dy_start = tl.dot(dy_t, start.to(dy_t.dtype), input_precision=PRECISION)  # (BLOCK_T, BLOCK_N)
        from_start = tl.where(ok_t, tl.exp(cs_t), 0.0)
        dc += dy_start * from_start[:, None]
        dcs_t = tl.sum(dy_start * c_t.to(tl.float32), axis=1) * from_start

        # within the chunk, over the sources s <= t
        for s0 in range(0, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            pos_s = c * T + offs_s
            ok_s = (offs_s < T) & (pos_s < L)
            cs_s = tl.load(cs_row + offs_s, mask=ok_s, other=0.0)
            dt_s = tl.load(DT + (b * L + pos_s) * H + h, mask=ok_s, other=0.0)
            inside = (offs_t[:, None] >= offs_s[None, :]) & ok_t[:, None] & ok_s[None, :]
            decay = tl.exp(tl.where(inside, cs_t[:, None] - cs_s[None, :], float("-inf")))  # (BLOCK_T, BLOCK_S)
            cb = tl.load(cb_rows + offs_s[None, :], mask=inside, other=0.0)
            x_s = tl.load(X + b * s_xb + h * s_xh + pos_s[:, None] * s_xl + offs_p[None, :],
                          mask=ok_s[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_S, BLOCK_P)
            b_s = tl.load(B + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + offs_n[None, :],
                          mask=ok_s[:, None] & ok_n[None, :], other=0.0)  # (BLOCK_S, BLOCK_N)
            d_weight = tl.dot(dy_t, tl.trans(x_s), input_precision=PRECISION) * dt_s[None, :] * decay
            dc += tl.dot(d_weight.to(b_s.dtype), b_s, input_precision=PRECISION)
            dcs_t += tl.sum(d_weight * cb, axis=1)

        dcs_slot = DCS + ((b * H + h) * n_chunks + c) * T + offs_t
        tl.store(dcs_slot, tl.load(dcs_slot, mask=ok_t, other=0.0) + dcs_t, mask=ok_t)
    dc_rows = DC + split * s_dcsplit + ((b * L + pos_t[:, None]) * G + g) * N + offs_n[None, :]
    tl.store(dc_rows, dc, mask=ok_t[:, None] & ok_n[None, :])
