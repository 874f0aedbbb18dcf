"""The forward kernels of the chunked Mamba-2 (SSD) scan; ssd_op.py launches them.

Per batch b, head h (of group g = h // (H / G)) and chunk c of T steps, with the step sizes
dt and cs, the in-chunk cumulative sum of dt·A, both (batch, H, c, T) (ssd_dt.py computes them
in an autograd Function, which carries their gradients to dt and A):
  1. `cb_kernel`: CB[b, c, g] = C_t · B_s for s <= t, a (T, T) tile per group, shared by its heads;
  2. `chunk_state_kernel`: each chunk's own contribution to the state at its end,
     sum_s dt_s exp(cs_end - cs_s) x_s ⊗ B_s, a (P, N) tile (also used by the backward with
     dy, C and exp(cs_t) for the gradient of each chunk's start state);
  3. `state_passing_kernel`: the state across chunks, h_c = exp(cs_end) h_{c-1} + contribution_c,
     sequential over c; it overwrites each chunk's contribution with the state the chunk starts
     from and writes the final state;
  4. `chunk_output_kernel`: y_t = exp(cs_t) C_t · h_start + sum_{s<=t} CB_ts exp(cs_t - cs_s) dt_s x_s
     + D x_t.
Positions past L (the last chunk's padding) load as zeros; every decay is masked to the valid
lower triangle before exp, so exp never sees a positive number."""

from __future__ import annotations

import triton
import triton.language as tl

from .helpers import chunk_group, tiles_last


@triton.jit
def cb_kernel(C, B, CB, L, T, n_chunks, G, N,
              s_cb, s_cl, s_cg, s_bb, s_bl, s_bg,
              BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # grid (batch * c * G * cdiv(T, BLOCK_M) * cdiv(T, BLOCK_S),), a chunk's tiles together; CB: (batch, c, G, T, T) fp32
    pid, pid_t, pid_s = tiles_last(tl.cdiv(T, BLOCK_M), tl.cdiv(T, BLOCK_S))
    g = pid % G
    c = (pid // G) % n_chunks
    b = pid // (G * n_chunks)
    if (pid_s * BLOCK_S > pid_t * BLOCK_M + BLOCK_M - 1) | (c * T + pid_t * BLOCK_M >= L):
        return  # above the diagonal, or past L: never read
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    pos_t, pos_s = c * T + offs_t, c * T + offs_s
    ok_t = (offs_t < T) & (pos_t < L)
    ok_s = (offs_s < T) & (pos_s < L)
    acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok_k = offs_k < N
        c_tile = tl.load(C + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + offs_k[None, :],
                         mask=ok_t[:, None] & ok_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b_tile = tl.load(B + b * s_bb + g * s_bg + pos_s[None, :] * s_bl + offs_k[:, None],
                         mask=ok_k[:, None] & ok_s[None, :], other=0.0)  # (BLOCK_K, BLOCK_S)
        acc += tl.dot(c_tile, b_tile, input_precision=PRECISION)
    out = CB + (((b * n_chunks + c) * G + g) * T + offs_t[:, None]) * T + offs_s[None, :]
    tl.store(out, acc, mask=(offs_t[:, None] < T) & (offs_s[None, :] < T))


@triton.jit
def chunk_state_kernel(X, Y, DT, CS, OUT, L, T, n_chunks, H, G, P, N,
                       s_xb, s_xl, s_xh, s_yb, s_yl, s_yg,
                       FORWARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    # grid (batch * c * H, cdiv(P, BLOCK_P), cdiv(N, BLOCK_N)); OUT: (batch, c, H, P, N) fp32.
    # FORWARD: OUT = sum_s dt_s exp(cs_end - cs_s) x_s ⊗ B_s (X = x, Y = B);
    # else:    OUT = sum_t exp(cs_t) dy_t ⊗ C_t             (X = dy, Y = C)
    pid, pid_p, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = pid % H
    c = (pid // H) % n_chunks
    b = pid // (H * n_chunks)
    g = h // (H // G)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = ((b * H + h) * n_chunks + c) * T  # the head's chunk in the (batch, H, c, T) layout of cs and dt
    cs_row = CS + row
    cs_end = tl.load(cs_row + T - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.minimum(T, L - c * T), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        pos = c * T + offs_k
        ok = (offs_k < T) & (pos < L)
        cs = tl.load(cs_row + offs_k, mask=ok, other=0.0)
        if FORWARD:
            dt = tl.load(DT + row + offs_k, mask=ok, other=0.0)
            w = tl.where(ok, dt * tl.exp(cs_end - cs), 0.0)
        else:
            w = tl.where(ok, tl.exp(cs), 0.0)
        x = tl.load(X + b * s_xb + h * s_xh + pos[None, :] * s_xl + offs_p[:, None],
                    mask=(offs_p[:, None] < P) & ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_K)
        y = tl.load(Y + b * s_yb + g * s_yg + pos[:, None] * s_yl + offs_n[None, :],
                    mask=ok[:, None] & (offs_n[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
        xw = (x.to(tl.float32) * w[None, :]).to(y.dtype)
        acc += tl.dot(xw, y, input_precision=PRECISION)
    out = OUT + (((b * n_chunks + c) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def state_passing_kernel(STATES, CS, INIT, FINAL, T, n_chunks, H, PN,
                         HAS_INIT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    # grid (batch * H, cdiv(P * N, BLOCK)); STATES: (batch, c, H, P * N) fp32, in: each chunk's
    # contribution, out: the state each chunk starts from; FINAL: (batch, H, P * N) fp32.
    # The chunks go GROUP at a time: one (GROUP, BLOCK) load per group, issued a group ahead, so
    # that GROUP chunks' loads are in flight while the serial chain runs through the previous ones
    pid, pid_e = tl.program_id(0), tl.program_id(1)
    h = pid % H
    b = pid // H
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PN
    rows = tl.arange(0, GROUP)
    if HAS_INIT:
        state = tl.load(INIT + (b * H + h) * PN + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    slots = STATES + (b * n_chunks * H + h) * PN + offs[None, :]  # + chunk * H * PN
    totals = CS + (b * H + h) * n_chunks * T + T - 1  # + chunk * T: each chunk's whole log decay
    own, log_decay = chunk_group(slots, totals, rows, ok, n_chunks, H * PN, T)
    for c0 in range(0, n_chunks, GROUP):
        own_next, log_decay_next = chunk_group(slots, totals, c0 + GROUP + rows, ok, n_chunks, H * PN, T)
        starts = tl.zeros((GROUP, BLOCK), dtype=tl.float32)
        for i in tl.static_range(GROUP):  # past the last chunk: no contribution and decay 1
            starts = tl.where(rows[:, None] == i, state[None, :], starts)
            decay = tl.exp(tl.sum(tl.where(rows == i, log_decay, 0.0), axis=0))
            state = decay * state + tl.sum(tl.where(rows[:, None] == i, own, 0.0), axis=0)
        chunk = c0 + rows
        tl.store(slots + chunk[:, None] * (H * PN), starts, mask=(chunk < n_chunks)[:, None] & ok[None, :])
        own, log_decay = own_next, log_decay_next
    tl.store(FINAL + (b * H + h) * PN + offs, state, mask=ok)


@triton.jit
def chunk_output_kernel(X, DT, CS, CB, STATES, C, D, Y, L, T, n_chunks, H, G, P, N,
                        s_xb, s_xl, s_xh, s_cb, s_cl, s_cg, s_yb, s_yl, s_yh,
                        HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    # grid (batch * c * H * cdiv(T, BLOCK_M) * cdiv(P, BLOCK_P),), a chunk's tiles together; Y: (batch, L, H, P)
    pid, pid_t, pid_p = tiles_last(tl.cdiv(T, BLOCK_M), tl.cdiv(P, BLOCK_P))
    h = pid % H
    c = (pid // H) % n_chunks
    b = pid // (H * n_chunks)
    g = h // (H // G)
    if c * T + pid_t * BLOCK_M >= L:
        return  # rows past L: nothing to write
    offs_t = pid_t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pos_t = c * T + offs_t
    ok_t = (offs_t < T) & (pos_t < L)
    ok_p = offs_p < P
    row = ((b * H + h) * n_chunks + c) * T  # the head's chunk in the (batch, H, c, T) layout of cs and dt
    cs_row = CS + row
    cs_t = tl.load(cs_row + offs_t, mask=ok_t, other=0.0)

    # from the state the chunk starts from: exp(cs_t) C_t · h_start
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    state = STATES + ((b * n_chunks + c) * H + h) * P * N
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok_k = offs_k < N
        c_tile = tl.load(C + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + offs_k[None, :],
                         mask=ok_t[:, None] & ok_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        h_tile = tl.load(state + offs_p[None, :] * N + offs_k[:, None],
                         mask=ok_k[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_K, BLOCK_P)
        acc += tl.dot(c_tile, h_tile.to(c_tile.dtype), input_precision=PRECISION)
    acc = acc * tl.exp(cs_t)[:, None]

    # within the chunk: sum_{s <= t} CB_ts exp(cs_t - cs_s) dt_s x_s. The s tiles wholly before this
    # tile's rows first: every s there is a step before every row (so before L) and needs no mask
    # (exp's argument is kept <= 0 for rows past L, whose cs loaded as 0); then the tiles the
    # diagonal crosses, under the triangle
    cb_rows = CB + ((b * n_chunks + c) * G + g) * T * T + offs_t[:, None] * T
    x_head = X + b * s_xb + h * s_xh
    in_t = (offs_t < T)[:, None]
    s_diagonal = (pid_t * BLOCK_M) // BLOCK_S * BLOCK_S
    for s0 in range(0, s_diagonal, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        cs_s = tl.load(cs_row + offs_s)
        dt_s = tl.load(DT + row + offs_s)
        decay = tl.exp(tl.minimum(cs_t[:, None] - cs_s[None, :], 0.0))
        cb = tl.load(cb_rows + offs_s[None, :], mask=in_t, other=0.0)  # (BLOCK_M, BLOCK_S)
        x_s = tl.load(x_head + (c * T + offs_s)[:, None] * s_xl + offs_p[None, :], mask=ok_p[None, :], other=0.0)
        acc += tl.dot((cb * decay * dt_s[None, :]).to(x_s.dtype), x_s, input_precision=PRECISION)
    s_end = tl.minimum((pid_t + 1) * BLOCK_M, T)
    for s0 in range(s_diagonal, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        pos_s = c * T + offs_s
        ok_s = (offs_s < T) & (pos_s < L)
        cs_s = tl.load(cs_row + offs_s, mask=ok_s, other=0.0)
        dt_s = tl.load(DT + row + offs_s, mask=ok_s, other=0.0)
        inside = (offs_t[:, None] >= offs_s[None, :]) & ok_t[:, None] & ok_s[None, :]
        decay = tl.exp(tl.minimum(cs_t[:, None] - cs_s[None, :], 0.0))
        # loaded under a mask that is constant along s (vector loads), the triangle selected after:
        # CB above the diagonal may be unwritten memory, which the select (not a product) keeps out
        cb = tl.load(cb_rows + offs_s[None, :], mask=ok_t[:, None] & (offs_s < T)[None, :],
                     other=0.0)  # (BLOCK_M, BLOCK_S)
        x_s = tl.load(x_head + pos_s[:, None] * s_xl + offs_p[None, :],
                      mask=ok_s[:, None] & ok_p[None, :], other=0.0)  # (BLOCK_S, BLOCK_P)
        w = tl.where(inside, cb * decay * dt_s[None, :], 0.0)
        acc += tl.dot(w.to(x_s.dtype), x_s, input_precision=PRECISION)

    x_t = tl.load(x_head + pos_t[:, None] * s_xl + offs_p[None, :],
                  mask=ok_t[:, None] & ok_p[None, :], other=0.0)
    if HAS_D:
        if D_PER_CHANNEL:
            d = tl.load(D + h * P + offs_p, mask=ok_p, other=0.0).to(tl.float32)
            acc += d[None, :] * x_t.to(tl.float32)
        else:
            acc += tl.load(D + h).to(tl.float32) * x_t.to(tl.float32)
    tl.store(Y + b * s_yb + h * s_yh + pos_t[:, None] * s_yl + offs_p[None, :], acc.to(Y.dtype.element_ty),
             mask=ok_t[:, None] & ok_p[None, :])
