"""Vision Mamba's two scan directions over one token order, without flipping anything in memory.

Inference only. The backward direction of a bidirectional layer scans the tokens L-1..0. Rather
than flipping x and z, running a causal conv and a scan, and flipping y back (three copies of
each (B, D, L) tensor), its conv runs anti-causally over the tokens as they lie and its scan runs
backward in time (`scan_fwd(reverse=True)`), so both directions read and write the same
positions:

    u_f[t] = SiLU(b_f + Σ_k w_f[k] x[t - (K-1) + k])      (causal)
    u_b[t] = SiLU(b_b + Σ_k w_b[k] x[t + (K-1) - k])      (anti-causal: the causal conv of flip(x), flipped)

`bidirectional_conv` writes both into one (B, 2D, Lp) buffer, the forward direction's channels
first. Sequences are laid out Lp >= L steps apart (a multiple of 16, so that the scan's rows are
aligned vectors); the steps from L to Lp are padding, where u is written as 0 so that the
backward scan, which meets them first, keeps its zero state through them.

The readable reference is `bidirectional_conv_ref` beside it (two calls of the causal conv)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import causal_conv1d_ref
from .host import cdiv


@triton.jit
def _bidirectional_conv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, Lp, dim,
                               s_xb, s_xd, s_yb, s_yd,
                               WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """A (BLOCK_D, BLOCK_L) tile of y (B, 2*dim, Lp); channel c < dim is the forward direction's
    channel c, c >= dim the backward direction's channel c - dim. BLOCK_D divides dim."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # stacked channels, (BLOCK_D,)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    backward = (tl.program_id(1) * BLOCK_D) >= dim  # the whole tile is one direction's
    sign = 1 - 2 * backward.to(tl.int32)  # +1: taps reach into the past, -1: into the future
    d = c - backward.to(tl.int32) * dim  # x's channel
    x_row = x_ptr + b * s_xb + d[:, None].to(tl.int64) * s_xd  # (BLOCK_D, 1)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        tt = t - sign * (WIDTH - 1 - k)  # (BLOCK_L,)
        xv = tl.load(x_row + tt[None, :], mask=((tt >= 0) & (tt < L))[None, :], other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + c * WIDTH + k).to(tl.float32)[:, None] * xv
    u = acc * tl.sigmoid(acc)
    u = tl.where((t < L)[None, :], u, 0.0)  # padding steps read as zero input to the scan
    out = y_ptr + b * s_yb + c[:, None].to(tl.int64) * s_yd + t[None, :]
    tl.store(out, u.to(y_ptr.dtype.element_ty), mask=(t < Lp)[None, :])


def _rows(t: torch.Tensor, name: str) -> None:
    if t.ndim != 3 or t.stride(2) != 1:
        raise ValueError(f"bidirectional_conv: {name} must be (B, C, L) with unit stride along L, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def bidirectional_conv(x: torch.Tensor, w_f: torch.Tensor, w_b: torch.Tensor, b_f: torch.Tensor | None,
                       b_b: torch.Tensor | None, length: int, out: torch.Tensor) -> torch.Tensor:
    """x (B, D, Lp) (any strides with unit stride along time; steps from `length` on are ignored),
    conv weights w_f, w_b (D, K) and biases (D,) or None -> `out` (B, 2D, Lp): SiLU of the causal
    conv of x with w_f in channels [0, D), of the anti-causal one with w_b in [D, 2D), and 0 at the
    padding steps t >= length."""
    _rows(x, "x")
    _rows(out, "out")
    batch, dim, padded = x.shape
    if out.shape != (batch, 2 * dim, padded):
        raise ValueError(f"bidirectional_conv: out must be {(batch, 2 * dim, padded)}, got {tuple(out.shape)}")
    if not 1 <= length <= padded:
        raise ValueError(f"bidirectional_conv: length {length} must be in [1, {padded}]")
    if w_f.shape != w_b.shape or w_f.ndim != 2 or w_f.shape[0] != dim:
        raise ValueError(f"bidirectional_conv: weights must both be ({dim}, K), got {tuple(w_f.shape)} "
                         f"and {tuple(w_b.shape)}")
    if (b_f is None) != (b_b is None):
        raise ValueError("bidirectional_conv: give both directions' biases or neither")
    width = w_f.shape[1]
    w = torch.cat([w_f, w_b]).contiguous()  # (2D, K)
    bias = torch.cat([b_f, b_b]).contiguous() if b_f is not None else w
    block_d = 1
    while block_d < 16 and dim % (block_d * 2) == 0:
        block_d *= 2
    block_l = 256 if block_d >= 8 else 1024 // block_d
    grid = (batch, 2 * dim // block_d, cdiv(padded, block_l))
    _bidirectional_conv_kernel[grid](x, w, bias, out, length, padded, dim, x.stride(0), x.stride(1),
                                     out.stride(0), out.stride(1), WIDTH=width, HAS_BIAS=b_f is not None,
                                     BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4)
    return out


def bidirectional_conv_ref(x: torch.Tensor, w_f: torch.Tensor, w_b: torch.Tensor, b_f: torch.Tensor | None,
                           b_b: torch.Tensor | None, length: int) -> torch.Tensor:
    """The reference of `bidirectional_conv`: (B, 2D, Lp) in fp32, from two causal convs (the
    backward one over the time-flipped first `length` steps, flipped back)."""
    batch, dim, padded = x.shape
    xs = x[..., :length].float()
    f = causal_conv1d_ref(xs, w_f.float(), None if b_f is None else b_f.float(), activation="silu")
    b = causal_conv1d_ref(xs.flip(-1), w_b.float(), None if b_b is None else b_b.float(), activation="silu").flip(-1)
    out = x.new_zeros(batch, 2 * dim, padded, dtype=torch.float32)
    out[:, :dim, :length] = f
    out[:, dim:, :length] = b
    return out
