"""The residual add and RMSNorm of a block, fused into one kernel.

It reproduces `Block._pre` followed by `RMSNorm.forward` exactly, roundings included:
    r = residual + hidden   (in fp32 when the residual is fp32)
    x = r rounded to the norm's dtype (its weight's), then fp32
    y = x / sqrt(mean(x^2) + eps) * weight, rounded to the norm's dtype, or once to `out_dtype`
        (autocast's: the rounding the next GEMM would apply to the norm's fp32 output)
At one token per decoding step the unfused version is six or more small kernels per layer; over
the (B, L, dim) rows of an encoder it is three passes (add, norm, autocast's cast) instead of one."""

from __future__ import annotations

import triton
import triton.language as tl

from .host import cdiv, next_power_of_2


@triton.jit
def _add_rms_norm_kernel(h_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, n_rows, dim, eps, s_h, s_r, s_y, s_ro,
                         HAS_RESIDUAL: tl.constexpr, ROUND_TO_WEIGHT: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """ROWS rows of `dim` features per program."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # (ROWS, 1)
    offs = tl.arange(0, BLOCK)[None, :]  # (1, BLOCK)
    mask = (offs < dim) & (rows < n_rows)
    r = tl.load(h_ptr + rows * s_h + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # torch adds in fp32 and rounds to the promoted dtype: so does this
        r = tl.load(r_ptr + rows * s_r + offs, mask=mask, other=0.0).to(tl.float32) + r
    r = r.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + rows * s_ro + offs, r, mask=mask)
    x = r.to(w_ptr.dtype.element_ty).to(tl.float32)
    ms = tl.sum(x * x, axis=1, keep_dims=True) / dim  # (ROWS, 1)
    w = tl.load(w_ptr + offs, mask=offs < dim, other=0.0).to(tl.float32)
    y = x * (1.0 / tl.sqrt(ms + eps)) * w
    if ROUND_TO_WEIGHT:
        y = y.to(w_ptr.dtype.element_ty)
    tl.store(y_ptr + rows * s_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden, residual, weight, eps: float, residual_dtype, out_dtype=None):
    """hidden: (..., dim); residual: the same shape, or None. Returns (normed, in out_dtype or
    else weight's dtype; the new residual in residual_dtype), both (..., dim) contiguous. Each
    input's rows may be strided (a view of padded rows, say) as long as its last axis is unit-stride."""
    import torch
    dim = hidden.shape[-1]
    h2 = _rows(hidden)
    r2 = _rows(residual) if residual is not None else None
    n_rows = h2.shape[0]
    y = torch.empty(hidden.shape, device=hidden.device, dtype=out_dtype or weight.dtype)
    r_out = torch.empty(hidden.shape, device=hidden.device, dtype=residual_dtype)
    block = next_power_of_2(dim)
    rows = max(1, min(16, 2048 // block))  # one row per program when decoding a few tokens
    rows = 1 if n_rows < 1024 else rows
    _add_rms_norm_kernel[(cdiv(n_rows, rows),)](
        h2, r2 if r2 is not None else h2, weight, y, r_out, n_rows, dim, eps, h2.stride(0),
        r2.stride(0) if r2 is not None else 0, dim, dim,
        HAS_RESIDUAL=residual is not None, ROUND_TO_WEIGHT=out_dtype is not None and out_dtype != weight.dtype,
        ROWS=rows, BLOCK=block, num_warps=4 if rows > 1 else 1)
    return y, r_out


def _rows(t):
    """t (..., dim) as 2-D (rows, dim) with unit stride along dim (a copy only where no view exists)."""
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, t.shape[-1])
