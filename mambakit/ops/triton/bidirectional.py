"""Vision Mamba's two scan directions over one token order, without flipping anything in memory.

Inference only. The backward direction of a bidirectional layer scans the tokens L-1..0. Rather
than flipping x and z, running a causal conv and a scan, and flipping y back (three copies of
each (B, D, L) tensor), its conv runs anti-causally over the tokens as they lie and its scan runs
backward in time (`scan_fwd(reverse=True)`), so both directions read and write the same
positions:

    u_f[t] = SiLU(b_f + Σ_k w_f[k] x[t - (K-1) + k])      (causal)
    u_b[t] = SiLU(b_b + Σ_k w_b[k] x[t + (K-1) - k])      (anti-causal: the causal conv of flip(x), flipped)

`bidirectional_conv` reads x as token rows (B, Lp, D) and writes both directions into one
(B, 2D, Lp) buffer with time contiguous, the forward direction's channels first. Sequences are
laid out Lp >= L steps apart (a multiple of 16, so that the scan's rows are aligned vectors);
the steps from L to Lp are padding, where u is written as 0 so that the backward scan, which
meets them first, keeps its zero state through them.

The readable reference is `bidirectional_conv_ref` beside it (two calls of the causal conv)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import causal_conv1d_ref
from ..backend import interpreting
from .host import cdiv
from .launch import launch
from .helpers import silu, widen


@triton.jit
def _conv_taps(x_tile, w_ptr, bias_ptr, t, d, mask_d, L, dim, s_xl, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr, MASKED: tl.constexpr):
    """Both directions' pre-activations (BLOCK_L, BLOCK_D) in fp32: the 2K-1 row shifts of x are
    loaded once and serve both. MASKED: rows outside [0, L) and channels past dim read as 0;
    without it the caller promises that the tile and its halo lie inside."""
    acc_f = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc_f += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(bias_ptr + dim + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(2 * WIDTH - 1):
        shift = j - (WIDTH - 1)  # the tap reads x[t + shift]
        tt = t + shift
        rows = x_tile + tt[:, None].to(tl.int64) * s_xl
        if MASKED:
            xv = tl.load(rows, mask=((tt >= 0) & (tt < L))[:, None] & mask_d[None, :], other=0.0)
        else:
            xv = tl.load(rows)
        xv = widen(xv, FAST)
        if shift <= 0:  # forward tap k = K-1 + shift
            wf = tl.load(w_ptr + d * WIDTH + (WIDTH - 1 + shift), mask=mask_d, other=0.0).to(tl.float32)
            acc_f += wf[None, :] * xv
        if shift >= 0:  # backward tap k = K-1 - shift
            wb = tl.load(w_ptr + (dim + d) * WIDTH + (WIDTH - 1 - shift), mask=mask_d, other=0.0).to(tl.float32)
            acc_b += wb[None, :] * xv
    return acc_f, acc_b


@triton.jit
def _bidirectional_conv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, Lp, dim,
                               s_xb, s_xl, s_yb, s_yd,
                               WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    """A (BLOCK_L, BLOCK_D) tile of both directions' outputs from the token rows x (B, Lp, dim)
    (channels contiguous, so each tap's shift in time is a whole row: aligned vector loads),
    written to y (B, 2*dim, Lp) with time contiguous (Triton transposes through shared memory).

    Tiles whose halo lies inside [0, L) and the channels (all but the edges of each sequence)
    load and store unmasked, and with FAST bf16 is widened two values at a time and SiLU runs on
    the special-function unit (`widen`, `silu`): 2,136 -> 1,280 SASS instructions an inner
    tile at 32 x 128, but on the H200 only 0.318 -> 0.276 ms at Vim-Ti's 1024-px layer, about
    twice its memory time: what bounds it is not yet known (BENCHMARKS.md, Vision Mamba)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * BLOCK_L
    d0 = tl.program_id(2) * BLOCK_D
    t = t0 + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_d = d < dim
    x_tile = x_ptr + b * s_xb + d[None, :]  # (1, BLOCK_D)
    row = y_ptr + b * s_yb + t[:, None]  # (BLOCK_L, 1)
    out_f = row + d[None, :].to(tl.int64) * s_yd
    out_b = row + (dim + d)[None, :].to(tl.int64) * s_yd
    if (t0 >= WIDTH - 1) & (t0 + BLOCK_L + WIDTH - 1 <= L) & (d0 + BLOCK_D <= dim):
        acc_f, acc_b = _conv_taps(x_tile, w_ptr, bias_ptr, t, d, mask_d, L, dim, s_xl, WIDTH, HAS_BIAS, BLOCK_L,
                                  BLOCK_D, FAST, False)
        tl.store(out_f, silu(acc_f, FAST).to(y_ptr.dtype.element_ty))
        tl.store(out_b, silu(acc_b, FAST).to(y_ptr.dtype.element_ty))
    else:
        acc_f, acc_b = _conv_taps(x_tile, w_ptr, bias_ptr, t, d, mask_d, L, dim, s_xl, WIDTH, HAS_BIAS, BLOCK_L,
                                  BLOCK_D, FAST, True)
        inside = (t < L)[:, None]  # padding steps read as zero input to the scans
        m_out = (t < Lp)[:, None] & mask_d[None, :]
        tl.store(out_f, tl.where(inside, silu(acc_f, FAST), 0.0).to(y_ptr.dtype.element_ty), mask=m_out)
        tl.store(out_b, tl.where(inside, silu(acc_b, FAST), 0.0).to(y_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _unpack8(v, BLOCK_D: tl.constexpr, NV: tl.constexpr):
    """(BLOCK_D, NV, 8) -> its 8 steps as (BLOCK_D, NV) tensors, by halving the in-thread axis
    (register renames where the 8 steps lie within each thread, as 16-byte vector loads put them)."""
    e, o = tl.split(tl.reshape(v, (BLOCK_D, NV, 4, 2)))  # steps 0 2 4 6 / 1 3 5 7
    ee, eo = tl.split(tl.reshape(e, (BLOCK_D, NV, 2, 2)))  # 0 4 / 2 6
    oe, oo = tl.split(tl.reshape(o, (BLOCK_D, NV, 2, 2)))  # 1 5 / 3 7
    v0, v4 = tl.split(ee)
    v2, v6 = tl.split(eo)
    v1, v5 = tl.split(oe)
    v3, v7 = tl.split(oo)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _pack8(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_D: tl.constexpr, NV: tl.constexpr):
    """The inverse of `_unpack8`: 8 (BLOCK_D, NV) steps -> (BLOCK_D, NV, 8)."""
    e = tl.reshape(tl.join(tl.join(v0, v4), tl.join(v2, v6)), (BLOCK_D, NV, 4))
    o = tl.reshape(tl.join(tl.join(v1, v5), tl.join(v3, v7)), (BLOCK_D, NV, 4))
    return tl.reshape(tl.join(e, o), (BLOCK_D, NV, 8))


@triton.jit
def _load8(rows, tt, L, mask_d, FAST: tl.constexpr, MASKED: tl.constexpr):
    """x at steps tt (BLOCK_D, NV, 8) of time-contiguous rows, in fp32, unpacked to 8 steps;
    steps outside [0, L) and channels outside the mask read as 0 when MASKED."""
    if MASKED:
        xv = tl.load(rows + tt, mask=(tt >= 0) & (tt < L) & mask_d, other=0.0)
    else:
        xv = tl.load(rows + tt)
    return _unpack8(widen(xv, FAST), xv.shape[0], xv.shape[1])


@triton.jit
def _tap(w_ptr, row, mask_d, k: tl.constexpr, WIDTH: tl.constexpr):
    """Tap k of the conv weights of channel rows `row` (BLOCK_D, 1), in fp32."""
    return tl.load(w_ptr + row * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)


@triton.jit
def _taps4(w0, w1, w2, w3, bias, x0, x1, x2, x3, FAST: tl.constexpr):
    """SiLU(bias + Σ_k w_k x_k): one output step of a width-4 conv, its four inputs given in tap order."""
    return silu(bias + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3, FAST)


@triton.jit
def _conv_run8(w0, w1, w2, w3, bias, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10,
               BLOCK_D: tl.constexpr, NV: tl.constexpr, FAST: tl.constexpr):
    """A run of 8 outputs (BLOCK_D, NV, 8) of a width-4 conv over the 11-step window a0..a10:
    output i is SiLU(bias + w0 a_i + w1 a_(i+1) + w2 a_(i+2) + w3 a_(i+3))."""
    return _pack8(_taps4(w0, w1, w2, w3, bias, a0, a1, a2, a3, FAST),
                  _taps4(w0, w1, w2, w3, bias, a1, a2, a3, a4, FAST),
                  _taps4(w0, w1, w2, w3, bias, a2, a3, a4, a5, FAST),
                  _taps4(w0, w1, w2, w3, bias, a3, a4, a5, a6, FAST),
                  _taps4(w0, w1, w2, w3, bias, a4, a5, a6, a7, FAST),
                  _taps4(w0, w1, w2, w3, bias, a5, a6, a7, a8, FAST),
                  _taps4(w0, w1, w2, w3, bias, a6, a7, a8, a9, FAST),
                  _taps4(w0, w1, w2, w3, bias, a7, a8, a9, a10, FAST), BLOCK_D, NV)


@triton.jit
def _bidirectional_conv_time_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, Lp, dim,
                                    s_xb, s_xd, s_yb, s_yd,
                                    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, NV: tl.constexpr,
                                    FAST: tl.constexpr):
    """As `_bidirectional_conv_kernel` (width 4) from time-contiguous rows x (B, dim, Lp): each
    thread holds runs of 8 steps of one channel, loads the runs before and after its own as
    aligned 16-byte vectors, and takes the shifted taps from those registers, so the output
    rows (time contiguous too) are stored as they are computed, with no transpose."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * (NV * 8)
    d0 = tl.program_id(2) * BLOCK_D
    d = (d0 + tl.arange(0, BLOCK_D))[:, None, None]  # (BLOCK_D, 1, 1)
    mask_d = d < dim
    tt = t0 + tl.arange(0, NV)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # (1, NV, 8)
    rows = x_ptr + b * s_xb + d.to(tl.int64) * s_xd
    inner = (t0 >= 8) & (t0 + NV * 8 + 8 <= L) & (d0 + BLOCK_D <= dim)
    # the run before each thread's own (only its last 3 steps are used), its own, the run after (first 3)
    if inner:
        p0, p1, p2, p3, p4, p5, p6, p7 = _load8(rows, tt - 8, L, mask_d, FAST, False)
        c0, c1, c2, c3, c4, c5, c6, c7 = _load8(rows, tt, L, mask_d, FAST, False)
        n0, n1, n2, n3, n4, n5, n6, n7 = _load8(rows, tt + 8, L, mask_d, FAST, False)
    else:
        p0, p1, p2, p3, p4, p5, p6, p7 = _load8(rows, tt - 8, L, mask_d, FAST, True)
        c0, c1, c2, c3, c4, c5, c6, c7 = _load8(rows, tt, L, mask_d, FAST, True)
        n0, n1, n2, n3, n4, n5, n6, n7 = _load8(rows, tt + 8, L, mask_d, FAST, True)
    dd = tl.reshape(d, (BLOCK_D, 1))
    md = tl.reshape(mask_d, (BLOCK_D, 1))
    wf0, wf1, wf2, wf3 = (_tap(w_ptr, dd, md, 0, 4), _tap(w_ptr, dd, md, 1, 4), _tap(w_ptr, dd, md, 2, 4),
                          _tap(w_ptr, dd, md, 3, 4))
    wb0, wb1, wb2, wb3 = (_tap(w_ptr, dd + dim, md, 0, 4), _tap(w_ptr, dd + dim, md, 1, 4),
                          _tap(w_ptr, dd + dim, md, 2, 4), _tap(w_ptr, dd + dim, md, 3, 4))
    bf = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    bb = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    if HAS_BIAS:
        bf = tl.load(bias_ptr + dd, mask=md, other=0.0).to(tl.float32)
        bb = tl.load(bias_ptr + dim + dd, mask=md, other=0.0).to(tl.float32)
    # forward tap k reads x[t - 3 + k]: the window from 3 steps before the run
    uf = _conv_run8(wf0, wf1, wf2, wf3, bf, p5, p6, p7, c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_D, NV, FAST)
    # backward tap k reads x[t + 3 - k]: the window from the run's first step, the taps reversed
    ub = _conv_run8(wb3, wb2, wb1, wb0, bb, c0, c1, c2, c3, c4, c5, c6, c7, n0, n1, n2, BLOCK_D, NV, FAST)
    out = y_ptr + b * s_yb + d.to(tl.int64) * s_yd + tt
    if inner:
        tl.store(out, uf.to(y_ptr.dtype.element_ty))
        tl.store(out + dim * s_yd, ub.to(y_ptr.dtype.element_ty))
    else:
        inside = tt < L  # padding steps read as zero input to the scans
        m_out = (tt < Lp) & mask_d
        tl.store(out, tl.where(inside, uf, 0.0).to(y_ptr.dtype.element_ty), mask=m_out)
        tl.store(out + dim * s_yd, tl.where(inside, ub, 0.0).to(y_ptr.dtype.element_ty), mask=m_out)


def bidirectional_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, length: int,
                       out: torch.Tensor, block: tuple[int, ...] | None = None) -> torch.Tensor:
    """x (B, Lp, D), with unit stride along channels (token rows) or along time (a view of time
    rows (B, D, Lp), 16-byte aligned, Lp a multiple of 8; then the width must be 4); steps from
    `length` on are ignored. weight (2D, K): the forward direction's conv weights, then the
    backward one's; bias (2D,) or None -> `out` (B, 2D, Lp), unit stride along time: SiLU of the
    causal conv of x with weight[:D] in channels [0, D), of the anti-causal one with weight[D:]
    in [D, 2D), and 0 at the padding steps t >= length."""
    time_rows = x.ndim == 3 and x.stride(1) == 1 and x.shape[2] > 1
    if x.ndim != 3 or not (x.stride(2) == 1 or time_rows):
        raise ValueError(f"bidirectional_conv: x must be (B, L, D) with unit stride along D or along L, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    if out.ndim != 3 or out.stride(2) != 1:
        raise ValueError(f"bidirectional_conv: out must be (B, 2D, L) with unit stride along L, "
                         f"got shape {tuple(out.shape)} strides {out.stride()}")
    batch, padded, dim = x.shape
    if out.shape != (batch, 2 * dim, padded):
        raise ValueError(f"bidirectional_conv: out must be {(batch, 2 * dim, padded)}, got {tuple(out.shape)}")
    if not 1 <= length <= padded:
        raise ValueError(f"bidirectional_conv: length {length} must be in [1, {padded}]")
    if weight.ndim != 2 or weight.shape[0] != 2 * dim or not weight.is_contiguous():
        raise ValueError(f"bidirectional_conv: weight must be contiguous (2D, K) = ({2 * dim}, K), both "
                         f"directions stacked; got {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (2 * dim,) or not bias.is_contiguous()):
        raise ValueError(f"bidirectional_conv: bias must be contiguous ({2 * dim},) or None, got {tuple(bias.shape)}")
    width = weight.shape[1]
    if time_rows:
        return _conv_time_rows(x, weight, bias, length, out, block)
    if block is None:  # (BLOCK_L, BLOCK_D, warps), from the H200 sweeps (benchmarks/tuning/tune_vim.py, Vim-Ti at
        # 1024 px: 32 x 128 x 4 warps 0.32 ms, 64 x 64 0.37, 128 x 128 2.0; with the unmasked inner
        # tiles and FAST, 32 x 128 x 4 0.276, 16 x 128 x 4 0.30, 64 x 64 0.35); a sweep's override otherwise
        block = (32, min(128, max(16, 1 << (dim - 1).bit_length())), 4)
    block_l, block_d, warps, *cap = block  # an optional fourth: a register cap (maxnreg)
    grid = (batch, cdiv(padded, block_l), cdiv(dim, block_d))
    limits = dict(maxnreg=cap[0]) if cap and cap[0] and not interpreting() else {}
    launch(_bidirectional_conv_kernel, grid,
           [x, weight, bias if bias is not None else weight, out, length, padded, dim, x.stride(0), x.stride(1),
            out.stride(0), out.stride(1)],
           dict(WIDTH=width, HAS_BIAS=bias is not None, BLOCK_L=block_l, BLOCK_D=block_d,
                FAST=not interpreting(), num_warps=warps, **limits))
    return out


def _conv_time_rows(x, weight, bias, length, out, block):
    """`bidirectional_conv` from time rows: x (B, Lp, D) a view of (B, D, Lp)."""
    batch, padded, dim = x.shape
    if weight.shape[1] != 4:
        raise ValueError(f"bidirectional_conv: from time rows the conv width must be 4, got {weight.shape[1]}")
    if padded % 8 or x.stride(2) % 8 or x.data_ptr() % 16 or out.stride(1) % 8 or out.data_ptr() % 16:
        raise ValueError(f"bidirectional_conv: time rows must be 16-byte aligned runs of 8 steps (Lp = {padded}, "
                         f"strides {x.stride()} and {out.stride()})")
    # (channels, runs of 8 steps, warps), from the H200 at Vim-Ti's 1024-px shape
    # (benchmarks/tuning/tune_vim.py --parts convtime): 4 x 32 x 4 0.193 ms, 8 x 16 x 4 0.206,
    # 16 x 8 x 4 0.211, against 0.275 from token rows; 32 x 4 x 4 0.64. A warp's lanes along
    # time read and write whole rows
    block_d, runs, warps = block or (4, 32, 4)
    grid = (batch, cdiv(padded, runs * 8), cdiv(dim, block_d))
    launch(_bidirectional_conv_time_kernel, grid,
           [x, weight, bias if bias is not None else weight, out, length, padded, dim, x.stride(0), x.stride(2),
            out.stride(0), out.stride(1)],
           dict(HAS_BIAS=bias is not None, BLOCK_D=block_d, NV=runs,
                FAST=not interpreting(), num_warps=warps))
    return out


def bidirectional_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           length: int) -> torch.Tensor:
    """The reference of `bidirectional_conv`: (B, 2D, Lp) in fp32, from two causal convs (the
    backward one over the time-flipped first `length` steps, flipped back)."""
    batch, padded, dim = x.shape
    xs = x[:, :length].transpose(1, 2).float()  # (B, D, length)
    w, b = weight.float(), None if bias is None else bias.float()
    f = causal_conv1d_ref(xs, w[:dim], None if b is None else b[:dim], activation="silu")
    bwd = causal_conv1d_ref(xs.flip(-1), w[dim:], None if b is None else b[dim:], activation="silu").flip(-1)
    out = x.new_zeros(batch, 2 * dim, padded, dtype=torch.float32)
    out[:, :dim, :length] = f
    out[:, dim:, :length] = bwd
    return out
