"""The depthwise causal conv1d in Triton, with the SiLU fused: forward and backward.

A program computes a (BLOCK_D, BLOCK_L) tile of y[b, d, t] = bias[d] + Σ_k w[d, k] x[b, d, t-(K-1)+k]
from K shifted loads, taking x at negative times from the initial state, or from each packed
sequence's own initial state and never across a `cu_seqlens` boundary. The backward pass
recomputes the pre-activation, and forms dx as the transposed conv of da = dy·SiLU'(a),
together with d(initial state). dw and dbias are summed per program and then added by torch in
a fixed order, so the backward is deterministic. The final state (the last K-1 inputs of each
sequence) is gathered by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit
def _x_at(x_ptr, init_ptr, b, offs_d, tt, seq_start, seq_id, mask_d, L, dim, s_xb, s_xd, s_xl,
          WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    """x at times tt (BLOCK_L,) for channels offs_d: before its sequence's start, the initial state."""
    inside = (tt >= seq_start) & (tt < L)
    ptr = x_ptr + b.to(tl.int64) * s_xb + offs_d[:, None].to(tl.int64) * s_xd + tt[None, :].to(tl.int64) * s_xl
    xv = tl.load(ptr, mask=mask_d[:, None] & inside[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        j = tt - seq_start + (WIDTH - 1)  # index into the (K-1) initial inputs
        before = (tt < seq_start) & (j >= 0)
        row = (b + seq_id).to(tl.int64) * dim * (WIDTH - 1)  # (B or S, D, K-1)
        sptr = init_ptr + row[None, :] + offs_d[:, None].to(tl.int64) * (WIDTH - 1) + j[None, :]
        xv += tl.load(sptr, mask=mask_d[:, None] & before[None, :], other=0.0).to(tl.float32)
    return xv


@triton.jit
def _pre_activation(x_ptr, w_ptr, bias_ptr, init_ptr, b, offs_d, t, seq_start, seq_id, mask_d, L, dim,
                    s_xb, s_xd, s_xl, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * _x_at(x_ptr, init_ptr, b, offs_d, t - (WIDTH - 1) + k, seq_start, seq_id, mask_d, L,
                                   dim, s_xb, s_xd, s_xl, WIDTH, HAS_INIT)
    return acc


@triton.jit
def _tile(L, dim, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """A program's (batch, channels, times) tile of the (B, D, L) grid, with its masks."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    return b, offs_d, t, offs_d < dim, t < L


@triton.jit
def _seq_info(seq_start_ptr, seq_id_ptr, t, mask_t, VARLEN: tl.constexpr):
    if VARLEN:
        return (tl.load(seq_start_ptr + t, mask=mask_t, other=0), tl.load(seq_id_ptr + t, mask=mask_t, other=0))
    return t * 0, t * 0


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_start_ptr, seq_id_ptr, y_ptr, L, dim,
                     s_xb, s_xd, s_xl,
                     WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    b, offs_d, t, mask_d, mask_t = _tile(L, dim, BLOCK_D, BLOCK_L)
    seq_start, seq_id = _seq_info(seq_start_ptr, seq_id_ptr, t, mask_t, VARLEN)
    a = _pre_activation(x_ptr, w_ptr, bias_ptr, init_ptr, b, offs_d, t, seq_start, seq_id, mask_d, L, dim,
                        s_xb, s_xd, s_xl, WIDTH, HAS_BIAS, HAS_INIT, BLOCK_D, BLOCK_L)
    if SILU:
        a = a * tl.sigmoid(a)
    out = y_ptr + b.to(tl.int64) * dim * L + offs_d[:, None].to(tl.int64) * L + t[None, :]
    tl.store(out, a.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])


@triton.jit
def _conv_da_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, seq_start_ptr, seq_id_ptr, dy_ptr, da_ptr, L, dim,
                    s_xb, s_xd, s_xl, s_gb, s_gd, s_gl,
                    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                    VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """da = dy * SiLU'(a), with a recomputed: (B, D, L) fp32."""
    b, offs_d, t, mask_d, mask_t = _tile(L, dim, BLOCK_D, BLOCK_L)
    m = mask_d[:, None] & mask_t[None, :]
    dy = tl.load(dy_ptr + b.to(tl.int64) * s_gb + offs_d[:, None].to(tl.int64) * s_gd + t[None, :].to(tl.int64) * s_gl,
                 mask=m, other=0.0).to(tl.float32)
    if SILU:
        seq_start, seq_id = _seq_info(seq_start_ptr, seq_id_ptr, t, mask_t, VARLEN)
        a = _pre_activation(x_ptr, w_ptr, bias_ptr, init_ptr, b, offs_d, t, seq_start, seq_id, mask_d, L, dim,
                            s_xb, s_xd, s_xl, WIDTH, HAS_BIAS, HAS_INIT, BLOCK_D, BLOCK_L)
        sa = tl.sigmoid(a)
        dy = dy * sa * (1.0 + a * (1.0 - sa))
    tl.store(da_ptr + b.to(tl.int64) * dim * L + offs_d[:, None].to(tl.int64) * L + t[None, :], dy, mask=m)


@triton.jit
def _conv_dx_kernel(x_ptr, init_ptr, seq_start_ptr, seq_id_ptr, seq_end_ptr, w_ptr, da_ptr, dx_ptr,
                    dw_part_ptr, dbias_part_ptr, L, dim, n_lblocks, s_xb, s_xd, s_xl, s_ob, s_od, s_ol,
                    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx[e] = Σ_k w[k] da[e + (K-1) - k] within e's sequence; partial dw, dbias per program."""
    b, offs_d, e, mask_d, mask_e = _tile(L, dim, BLOCK_D, BLOCK_L)
    pid_l = tl.program_id(2)
    if VARLEN:
        seq_end = tl.load(seq_end_ptr + e, mask=mask_e, other=0)
    else:
        seq_end = e * 0 + L
    seq_start, seq_id = _seq_info(seq_start_ptr, seq_id_ptr, e, mask_e, VARLEN)
    da_row = da_ptr + b.to(tl.int64) * dim * L + offs_d[:, None].to(tl.int64) * L
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        tt = e + (WIDTH - 1) - k  # the output that reads x[e] through tap k
        ok = (tt < seq_end) & mask_e
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        dx += wk[:, None] * tl.load(da_row + tt[None, :], mask=mask_d[:, None] & ok[None, :], other=0.0)
    m = mask_d[:, None] & mask_e[None, :]
    dx_off = b.to(tl.int64) * s_ob + offs_d[:, None].to(tl.int64) * s_od + e[None, :].to(tl.int64) * s_ol
    tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    # dw[d, k] = Σ_t da[t] x[t - (K-1) + k], with t over this program's outputs
    da = tl.load(da_row + e[None, :], mask=m, other=0.0)
    part = ((b * n_lblocks + pid_l).to(tl.int64) * dim + offs_d.to(tl.int64)) * WIDTH
    for k in tl.static_range(WIDTH):
        xv = _x_at(x_ptr, init_ptr, b, offs_d, e - (WIDTH - 1) + k, seq_start, seq_id, mask_d, L, dim,
                   s_xb, s_xd, s_xl, WIDTH, HAS_INIT)
        tl.store(dw_part_ptr + part + k, tl.sum(da * xv, axis=1), mask=mask_d)
    tl.store(dbias_part_ptr + (b * n_lblocks + pid_l).to(tl.int64) * dim + offs_d, tl.sum(da, axis=1), mask=mask_d)


def _varlen_maps(cu_seqlens, L, device):
    """Per position: its sequence's start, index and end, (L,) int32 each."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=L)
    return (cu_seqlens[:-1].long()[seq_id].to(torch.int32), seq_id.to(torch.int32),
            cu_seqlens[1:].long()[seq_id].to(torch.int32))


def _launch_shape(x):
    batch, dim, L = x.shape
    BLOCK_D, BLOCK_L = 16, min(128, max(16, next_power_of_2(L)))
    return batch, dim, L, BLOCK_D, BLOCK_L, (batch, cdiv(dim, BLOCK_D), cdiv(L, BLOCK_L))


def conv_fwd(x, weight, bias, initial_state, silu, cu_seqlens):
    """y (B, D, L) in x's dtype. initial_state: (B, D, K-1), or (S, D, K-1) with cu_seqlens."""
    batch, dim, L, BLOCK_D, BLOCK_L, grid = _launch_shape(x)
    width = weight.shape[1]
    weight = weight.contiguous()
    init = None if initial_state is None or width == 1 else initial_state.contiguous()
    maps = _varlen_maps(cu_seqlens, L, x.device) if cu_seqlens is not None else (None, None, None)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dummy = weight
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else dummy, init if init is not None else dummy,
        maps[0] if maps[0] is not None else dummy, maps[1] if maps[1] is not None else dummy, y, L, dim,
        *x.stride(), WIDTH=width, HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=silu,
        VARLEN=cu_seqlens is not None, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    return y


def conv_bwd(x, weight, bias, initial_state, silu, cu_seqlens, dy, dx_out=None):
    """(dx (B, D, L) in x's dtype, dweight (D, K), dbias (D,) or None, dinit or None in fp32).
    dx_out: a (B, D, L) tensor of x's dtype, with any strides, to write dx into; it may be dy
    itself (dy is read whole, into da, before dx is written)."""
    batch, dim, L, BLOCK_D, BLOCK_L, grid = _launch_shape(x)
    width = weight.shape[1]
    weight = weight.contiguous()
    init = None if initial_state is None or width == 1 else initial_state.contiguous()
    maps = _varlen_maps(cu_seqlens, L, x.device) if cu_seqlens is not None else (None, None, None)
    f32 = dict(device=x.device, dtype=torch.float32)
    da = torch.empty(x.shape, **f32)
    dummy = weight
    common = dict(WIDTH=width, HAS_INIT=init is not None, VARLEN=cu_seqlens is not None, BLOCK_D=BLOCK_D,
                  BLOCK_L=BLOCK_L)
    _conv_da_kernel[grid](
        x, weight, bias if bias is not None else dummy, init if init is not None else dummy,
        maps[0] if maps[0] is not None else dummy, maps[1] if maps[1] is not None else dummy, dy, da, L, dim,
        *x.stride(), *dy.stride(), HAS_BIAS=bias is not None, SILU=silu, **common)
    n_lblocks = grid[2]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if dx_out is None else dx_out  # rounded once, on the store
    dw_part = torch.empty(batch, n_lblocks, dim, width, **f32)
    dbias_part = torch.empty(batch, n_lblocks, dim, **f32)
    _conv_dx_kernel[grid](
        x, init if init is not None else dummy, *(m if m is not None else dummy for m in maps), weight, da, dx,
        dw_part, dbias_part, L, dim, n_lblocks, *x.stride(), *dx.stride(), **common)
    dinit = None
    if initial_state is not None:
        dinit = _dinit(weight, da, width, cu_seqlens, initial_state)
    return dx, dw_part.sum((0, 1)), dbias_part.sum((0, 1)) if bias is not None else None, dinit


def _dinit(weight, da, width, cu_seqlens, initial_state):
    """d(initial state)[j] = Σ_{r<=j} w[j - r] da[start + r] for each sequence: a small
    (K-1) x (K-1) contraction, done in torch."""
    starts = [0] if cu_seqlens is None else cu_seqlens[:-1].tolist()
    ends = [da.shape[-1]] * len(starts) if cu_seqlens is None else cu_seqlens[1:].tolist()
    out = torch.zeros(initial_state.shape, device=da.device, dtype=torch.float32)
    w = weight.float()
    for s, (a, e) in enumerate(zip(starts, ends)):
        rows = slice(None) if cu_seqlens is None else slice(s, s + 1)
        batch_rows = slice(None) if cu_seqlens is None else slice(0, 1)
        # initial input j sits at time a - (K-1) + j; output a + r reads it through tap j - r
        for j in range(width - 1):
            for r in range(0, min(j + 1, e - a)):
                out[rows, :, j] += w[:, j - r] * da[batch_rows, :, a + r]
    return out
