"""The backward kernels of the chunked Mamba-2 (SSD) scan; ssd_op.py launches them after
chunk_state_kernel (ssd_fwd_kernels.py) has summed each chunk's gradient of its start state
from the output, dh_c += sum_t exp(cs_t) dy_t ⊗ C_t.

With u_s = dt_s x_s, the forward is y_t = exp(cs_t) C_t · h_c + sum_{s<=t} CB_ts exp(cs_t - cs_s) u_s
+ D x_t and h_{c+1} = exp(cs_end) h_c + sum_s exp(cs_end - cs_s) u_s ⊗ B_s. The kernels here:
  1. `state_passing_bwd_kernel`: the chunks in reverse, carrying the gradient of the state:
     g_c = dh_c(from y) + exp(cs_end) g_{c+1}. Each chunk's slot gets g_{c+1} (the gradient of its
     contribution); the decay's gradient exp(cs_end) <g_{c+1}, h_c> goes to cs_end; g_0 is the
     initial state's gradient;
  2. `dx_kernel`, per head and block of source steps s: du_s, then dx_s = dt_s du_s + D dy_s,
     ddt_s = <x_s, du_s> and the whole gradient of cs_s. Every cs_t enters y_t as exp(cs_t) and
     every cs_s as exp(-cs_s), so the gradient of cs_t is <dy_t, y_t - D x_t> (all of y_t's terms
     but the skip carry exp(cs_t)) minus dt_t <x_t, du_t> (all of u_t's uses carry exp(-cs_t)),
     and cs_end also gets the state's part of the second: no (T x T) per-head work for it;
  3. `dcb_kernel`: dCB_ts = sum_h exp(cs_t - cs_s) dt_s <dy_t, x_s>, per group, once;
  4. `dbc_kernel`: dB = dCB^T C + the state's part, dC = dCB B + the start state's part, the
     heads of a group summed in registers.
The caller adds the cs_end gradients to each chunk's last step and lets autograd carry the
gradient of cs (an in-chunk cumsum of dt·A) to dt and A."""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import chunk_group, tiles_last


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
def _group_program(pid, n_chunks, H, G, heads_per_program):
    """(batch, chunk, group, split) of item `pid` of the dcb / dbc grids, which run over batch x c
    x G x splits, each split being heads_per_program consecutive heads of the group."""
    splits = (H // G) // heads_per_program
    return pid // (splits * G * n_chunks), (pid // (splits * G)) % n_chunks, (pid // splits) % G, pid % splits


@triton.jit
def dx_kernel(X, DT, CS, CB, DSTATES, B, D, DY, Y, DX, DDT, DCS, DCS_END, DD,
              L, T, n_chunks, H, G, P, N,
              s_xb, s_xl, s_xh, s_bb, s_bl, s_bg, s_yb, s_yl, s_yh, s_ob, s_ol, s_oh, s_dxb, s_dxl, s_dxh,
              HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, WANT_DD: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    # grid (batch * c * H * cdiv(T, BLOCK_S),), a chunk's blocks together: one head's block of
    # source steps s, all P channels.
    # du_s = exp(cs_end - cs_s) B_s · g_c  +  sum_{t >= s} CB_ts exp(cs_t - cs_s) dy_t; then
    # dx = dt du + D dy, ddt = <x, du>, and the whole gradient of cs_s (see the module's docstring):
    # dcs_s = <dy_s, y_s - D x_s> - dt_s <x_s, du_s>, with the state's part of the second term also
    # added to cs_end. DX (batch, L, H, P); DDT and DCS (batch, H, c, T) fp32;
    # DCS_END (batch, H, c) and DD (H,) or (H, P) fp32, added to. DY: dy; Y: the forward's y
    pid, _, pid_s = tiles_last(1, tl.cdiv(T, BLOCK_S))
    h = pid % H
    c = (pid // H) % n_chunks
    b = pid // (H * n_chunks)
    g = h // (H // G)
    if c * T + pid_s * BLOCK_S >= L:
        return  # sources past L: nothing to write (DCS stays 0 there)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    pos_s = c * T + offs_s
    ok_s = (offs_s < T) & (pos_s < L)
    ok_p = offs_p < P
    row = ((b * H + h) * n_chunks + c) * T  # the head's chunk in the (batch, H, c, T) layout of cs and dt
    cs_row = CS + row
    cs_s = tl.load(cs_row + offs_s, mask=ok_s, other=0.0)
    cs_end = tl.load(cs_row + T - 1)
    dt_s = tl.load(DT + row + offs_s, mask=ok_s, other=0.0)

    # through the chunk's contribution to the state at its end: B_s · g_c, g_c (P, N)
    grad_state = DSTATES + ((b * n_chunks + c) * H + h) * P * N
    du = tl.zeros((BLOCK_S, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok_k = offs_k < N
        b_tile = tl.load(B + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + offs_k[None, :],
                         mask=ok_s[:, None] & ok_k[None, :], other=0.0)  # (BLOCK_S, BLOCK_K)
        g_tile = tl.load(grad_state + offs_p[None, :] * N + offs_k[:, None],
                         mask=ok_k[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_K, BLOCK_P) fp32
        du += tl.dot(b_tile, g_tile.to(b_tile.dtype), input_precision=PRECISION)
    du = du * tl.where(ok_s, tl.exp(cs_end - cs_s), 0.0)[:, None]
    x_s = tl.load(X + b * s_xb + h * s_xh + pos_s[:, None] * s_xl + offs_p[None, :],
                  mask=ok_s[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_S, BLOCK_P)
    x32 = x_s.to(tl.float32)
    tl.atomic_add(DCS_END + (b * H + h) * n_chunks + c, tl.sum(tl.sum(du * x32, axis=1) * dt_s, axis=0))

    # within the chunk, over the targets t >= s: du_s += sum_t (CB_ts exp(cs_t - cs_s)) dy_t
    cb_cols = CB + ((b * n_chunks + c) * G + g) * T * T + offs_s[:, None]  # + t * T: CB[t, s] as (s, t)
    for t0 in range(pid_s * BLOCK_S, tl.minimum(T, L - c * T), BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        pos_t = c * T + offs_t
        ok_t = (offs_t < T) & (pos_t < L)
        cs_t = tl.load(cs_row + offs_t, mask=ok_t, other=0.0)
        inside = (offs_t[None, :] >= offs_s[:, None]) & ok_s[:, None] & ok_t[None, :]  # (BLOCK_S, BLOCK_T)
        decay = tl.exp(tl.minimum(cs_t[None, :] - cs_s[:, None], 0.0))  # the triangle is selected below
        # a mask constant along s, CB's contiguous axis here (vector loads); the triangle selected
        # after, since CB above the diagonal may be unwritten memory
        cb = tl.load(cb_cols + offs_t[None, :] * T, mask=(offs_s < T)[:, None] & ok_t[None, :], other=0.0)
        dy_t = tl.load(DY + b * s_yb + h * s_yh + pos_t[:, None] * s_yl + offs_p[None, :],
                       mask=ok_t[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_T, BLOCK_P)
        du += tl.dot(tl.where(inside, cb * decay, 0.0).to(dy_t.dtype), dy_t, input_precision=PRECISION)

    dy_s = tl.load(DY + b * s_yb + h * s_yh + pos_s[:, None] * s_yl + offs_p[None, :],
                   mask=ok_s[:, None] & ok_p[None, :], other=0.0).to(tl.float32)
    y_s = tl.load(Y + b * s_ob + h * s_oh + pos_s[:, None] * s_ol + offs_p[None, :],
                  mask=ok_s[:, None] & ok_p[None, :], other=0.0).to(tl.float32)
    ddt = tl.sum(du * x32, axis=1)  # (BLOCK_S,)
    dx = du * dt_s[:, None]
    if HAS_D:
        if D_PER_CHANNEL:
            d = tl.load(D + h * P + offs_p, mask=ok_p, other=0.0).to(tl.float32)[None, :]
        else:
            d = tl.load(D + h).to(tl.float32)
        dx += d * dy_s
        y_s -= d * x32  # y without its skip term: what the decays multiply
        if WANT_DD:
            dy_x = tl.sum(dy_s * x32, axis=0)  # (BLOCK_P,)
            if D_PER_CHANNEL:
                tl.atomic_add(DD + h * P + offs_p, dy_x, mask=ok_p)
            else:
                tl.atomic_add(DD + h, tl.sum(dy_x, axis=0))
    tl.store(DX + b * s_dxb + h * s_dxh + pos_s[:, None] * s_dxl + offs_p[None, :], dx.to(DX.dtype.element_ty),
             mask=ok_s[:, None] & ok_p[None, :])
    tl.store(DDT + row + offs_s, ddt, mask=ok_s)
    tl.store(DCS + row + offs_s, tl.sum(dy_s * y_s, axis=1) - dt_s * ddt, mask=ok_s)


@triton.jit
def dcb_kernel(X, DT, CS, DY, DCB, L, T, n_chunks, H, G, P, heads_per_program, s_split,
               s_xb, s_xl, s_xh, s_yb, s_yl, s_yh,
               BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # grid (batch * c * G * splits * cdiv(T, BLOCK_T) * cdiv(T, BLOCK_S),): the gradient of CB_ts = C_t · B_s,
    # dCB_ts = sum over the split's heads of exp(cs_t - cs_s) dt_s <dy_t, x_s>, t >= s (the rest is
    # never read). DCB (splits, batch, c, G, T, T) fp32
    pid, pid_t, pid_s = tiles_last(tl.cdiv(T, BLOCK_T), tl.cdiv(T, BLOCK_S))
    b, c, g, split = _group_program(pid, n_chunks, H, G, heads_per_program)
    if (pid_s * BLOCK_S > pid_t * BLOCK_T + BLOCK_T - 1) | (c * T + pid_t * BLOCK_T >= L):
        return
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    pos_t, pos_s = c * T + offs_t, c * T + offs_s
    ok_t = (offs_t < T) & (pos_t < L)
    ok_s = (offs_s < T) & (pos_s < L)
    inside = (offs_t[:, None] >= offs_s[None, :]) & ok_t[:, None] & ok_s[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for i in range(heads_per_program):
        h = g * (H // G) + split * heads_per_program + i
        dots = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for k0 in range(0, P, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ok_k = offs_k < P
            dy_t = tl.load(DY + b * s_yb + h * s_yh + pos_t[:, None] * s_yl + offs_k[None, :],
                           mask=ok_t[:, None] & ok_k[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
            x_s = tl.load(X + b * s_xb + h * s_xh + pos_s[None, :] * s_xl + offs_k[:, None],
                          mask=ok_k[:, None] & ok_s[None, :], other=0.0)  # (BLOCK_K, BLOCK_S)
            dots += tl.dot(dy_t, x_s, input_precision=PRECISION)
        row = ((b * H + h) * n_chunks + c) * T  # the head's chunk in the (batch, H, c, T) layout of cs and dt
        cs_row = CS + row
        cs_t = tl.load(cs_row + offs_t, mask=ok_t, other=0.0)
        cs_s = tl.load(cs_row + offs_s, mask=ok_s, other=0.0)
        dt_s = tl.load(DT + row + offs_s, mask=ok_s, other=0.0)
        acc += dots * tl.exp(tl.where(inside, cs_t[:, None] - cs_s[None, :], float("-inf"))) * dt_s[None, :]
    out = DCB + split * s_split + (((b * n_chunks + c) * G + g) * T + offs_t[:, None]) * T + offs_s[None, :]
    tl.store(out, acc, mask=(offs_t[:, None] < T) & (offs_s[None, :] < T))


@triton.jit
def dbc_kernel(X, DT, CS, DCB, STATES, DSTATES, B, C, DY, DB, DC,
               L, T, n_chunks, H, G, P, N, heads_per_program, s_split, s_dcb_split, n_dcb_splits,
               s_xb, s_xl, s_xh, s_bb, s_bl, s_bg, s_cb, s_cl, s_cg, s_yb, s_yl, s_yh,
               BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    # grid (batch * c * G * splits * cdiv(T, BLOCK) * cdiv(N, BLOCK_N),): for the steps j of a block,
    #   dB_j = sum_{t >= j} dCB_tj C_t + sum_h dt_j exp(cs_end - cs_j) x_j · g_c      (g_c: DSTATES)
    #   dC_j = sum_{s <= j} dCB_js B_s + sum_h exp(cs_j) dy_j · h_c                   (h_c: STATES)
    # over this split's heads (the dCB terms in split 0, dCB summed over its n_dcb_splits).
    # DB, DC (splits, batch, L, G, N) fp32
    pid, pid_j, pid_n = tiles_last(tl.cdiv(T, BLOCK), tl.cdiv(N, BLOCK_N))
    b, c, g, split = _group_program(pid, n_chunks, H, G, heads_per_program)
    if c * T + pid_j * BLOCK >= L:
        return
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    pos_j = c * T + offs_j
    ok_j = (offs_j < T) & (pos_j < L)
    ok_n, ok_p = offs_n < N, offs_p < P
    db = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    dc = tl.zeros((BLOCK, BLOCK_N), dtype=tl.float32)
    if split == 0:
        dcb = DCB + ((b * n_chunks + c) * G + g) * T * T
        for t0 in range(pid_j * BLOCK, tl.minimum(T, L - c * T), BLOCK):  # dB_j from the targets t >= j
            offs_t = t0 + tl.arange(0, BLOCK)
            pos_t = c * T + offs_t
            ok_t = (offs_t < T) & (pos_t < L)
            inside = (offs_t[None, :] >= offs_j[:, None]) & ok_j[:, None] & ok_t[None, :]  # (BLOCK j, BLOCK t)
            w = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k in range(n_dcb_splits):  # masks constant along dCB's contiguous axis (vector loads),
                w += tl.load(dcb + k * s_dcb_split + offs_t[None, :] * T + offs_j[:, None],  # the triangle after
                             mask=(offs_j < T)[:, None] & ok_t[None, :], other=0.0)
            w = tl.where(inside, w, 0.0)  # (dCB above the diagonal is never written)
            c_t = tl.load(C + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + offs_n[None, :],
                          mask=ok_t[:, None] & ok_n[None, :], other=0.0)  # (BLOCK, BLOCK_N)
            db += tl.dot(w.to(c_t.dtype), c_t, input_precision=PRECISION)
        for s0 in range(0, tl.minimum((pid_j + 1) * BLOCK, T), BLOCK):  # dC_j from the sources s <= j
            offs_s = s0 + tl.arange(0, BLOCK)
            pos_s = c * T + offs_s
            ok_s = (offs_s < T) & (pos_s < L)
            inside = (offs_j[:, None] >= offs_s[None, :]) & ok_j[:, None] & ok_s[None, :]  # (BLOCK j, BLOCK s)
            w = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k in range(n_dcb_splits):
                w += tl.load(dcb + k * s_dcb_split + offs_j[:, None] * T + offs_s[None, :],
                             mask=ok_j[:, None] & (offs_s < T)[None, :], other=0.0)
            w = tl.where(inside, w, 0.0)
            b_s = tl.load(B + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + offs_n[None, :],
                          mask=ok_s[:, None] & ok_n[None, :], other=0.0)
            dc += tl.dot(w.to(b_s.dtype), b_s, input_precision=PRECISION)
    for i in range(heads_per_program):  # the states' parts, head by head
        h = g * (H // G) + split * heads_per_program + i
        row = ((b * H + h) * n_chunks + c) * T  # the head's chunk in the (batch, H, c, T) layout of cs and dt
        cs_row = CS + row
        cs_j = tl.load(cs_row + offs_j, mask=ok_j, other=0.0)
        cs_end = tl.load(cs_row + T - 1)
        dt_j = tl.load(DT + row + offs_j, mask=ok_j, other=0.0)
        slot = ((b * n_chunks + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :]
        ok_pn = ok_p[:, None] & ok_n[None, :]
        x_j = tl.load(X + b * s_xb + h * s_xh + pos_j[:, None] * s_xl + offs_p[None, :],
                      mask=ok_j[:, None] & ok_p[None, :], other=0.0)  # (BLOCK, BLOCK_P)
        to_end = tl.where(ok_j, dt_j * tl.exp(cs_end - cs_j), 0.0)
        grad_state = tl.load(DSTATES + slot, mask=ok_pn, other=0.0)  # (BLOCK_P, BLOCK_N) fp32
        db += tl.dot((x_j.to(tl.float32) * to_end[:, None]).to(x_j.dtype), grad_state.to(x_j.dtype),
                     input_precision=PRECISION)
        dy_j = tl.load(DY + b * s_yb + h * s_yh + pos_j[:, None] * s_yl + offs_p[None, :],
                       mask=ok_j[:, None] & ok_p[None, :], other=0.0)
        from_start = tl.where(ok_j, tl.exp(cs_j), 0.0)
        start = tl.load(STATES + slot, mask=ok_pn, other=0.0)
        dc += tl.dot((dy_j.to(tl.float32) * from_start[:, None]).to(dy_j.dtype), start.to(dy_j.dtype),
                     input_precision=PRECISION)
    rows = split * s_split + ((b * L + pos_j[:, None]) * G + g) * N + offs_n[None, :]
    tl.store(DB + rows, db, mask=ok_j[:, None] & ok_n[None, :])
    tl.store(DC + rows, dc, mask=ok_j[:, None] & ok_n[None, :])
