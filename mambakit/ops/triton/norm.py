"""The residual add and RMSNorm of a decoding step, fused into one kernel.

It reproduces `Block._pre` followed by `RMSNorm.forward` exactly, roundings included:
    r = residual + hidden   (in fp32 when the residual is fp32)
    x = r rounded to the norm's dtype, then fp32
    y = x / sqrt(mean(x^2) + eps) * weight, rounded to the norm's dtype
At one token per step the unfused version is six or more small kernels per layer."""

from __future__ import annotations

import triton
import triton.language as tl

from .host import next_power_of_2


@triton.jit
def _add_rms_norm_kernel(h_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, dim, eps, s_h, s_r, s_y, s_ro,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    r = tl.load(h_ptr + row * s_h + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # torch adds in fp32 and rounds to the promoted dtype: so does this
        r = tl.load(r_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32) + r
    r = r.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + row * s_ro + offs, r, mask=mask)
    x = r.to(y_ptr.dtype.element_ty).to(tl.float32)
    ms = tl.sum(x * x, axis=0) / dim
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * (1.0 / tl.sqrt(ms + eps)) * w
    tl.store(y_ptr + row * s_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden, residual, weight, eps: float, residual_dtype):
    """hidden: (B, dim); residual: (B, dim) or None. Returns (normed (B, dim) in weight's dtype,
    the new residual (B, dim) in residual_dtype)."""
    import torch
    batch, dim = hidden.shape
    y = torch.empty(batch, dim, device=hidden.device, dtype=weight.dtype)
    r_out = torch.empty(batch, dim, device=hidden.device, dtype=residual_dtype)
    _add_rms_norm_kernel[(batch,)](
        hidden, residual if residual is not None else hidden, weight, y, r_out, dim, eps, hidden.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0), r_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(dim))
    return y, r_out
