"""out_proj, the next block's residual add and its RMSNorm, fused into one kernel (Vim's padded
inference path, where out_proj reads time rows).

Unfused, a layer's end is a product (B, D, Lp) -> (B, Lp, dim) written in the compute dtype,
then `add_rms_norm` reads it back with the residual. Here each program computes BLOCK_M tokens'
whole rows of the product on the tensor cores and finishes them in registers, with the roundings
of the unfused path:
    h = y^T W^T + bias, rounded to y's dtype     (what out_proj would have written)
    r = residual + h in fp32                      (the new residual, stored)
    x = r rounded to the norm weight's dtype, then y = x / sqrt(mean(x^2) + eps) * weight, stored
        in out_dtype (rounded to the weight's dtype first where that differs, as `add_rms_norm`)
so the product is never written and read again. The readable reference is
`out_proj_add_rms_norm_ref` beside it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _interpreting
from .host import cdiv, next_power_of_2
from .launch import launch


@triton.jit
def _out_proj_add_rms_norm_kernel(y_ptr, w_ptr, bias_ptr, r_ptr, nw_ptr, out_ptr, r_out_ptr, Lp, K, N, eps,
                                  s_yb, s_yk, s_rb, s_rl,
                                  HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                  ROUND_TO_WEIGHT: tl.constexpr, WIDEN: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) tokens of sequence b
    n = tl.arange(0, BLOCK_N)
    mask_t, mask_n = t < Lp, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(y_ptr + b * s_yb + k[None, :].to(tl.int64) * s_yk + t[:, None],
                    mask=mask_t[:, None] & (k < K)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K), time contiguous
        w = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=(k < K)[:, None] & mask_n[None, :],
                    other=0.0)  # (BLOCK_K, BLOCK_N) = W^T
        if WIDEN:  # the interpreter's bf16 product is wrong (Triton 3.9): in fp32 there
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    r = acc.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)  # out_proj's rounding
    rows = b * Lp + t  # (BLOCK_M,) token rows of the (B, Lp, N) outputs
    m2 = mask_t[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r += tl.load(r_ptr + b * s_rb + t[:, None].to(tl.int64) * s_rl + n[None, :], mask=m2, other=0.0).to(tl.float32)
    r = r.to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + rows[:, None] * N + n[None, :], r, mask=m2)
    x = r.to(nw_ptr.dtype.element_ty).to(tl.float32)
    ms = tl.sum(x * x, axis=1, keep_dims=True) / N  # (BLOCK_M, 1)
    nw = tl.load(nw_ptr + n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = x * (1.0 / tl.sqrt(ms + eps)) * nw
    if ROUND_TO_WEIGHT:
        out = out.to(nw_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * N + n[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


def out_proj_add_rms_norm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                          out_dtype: torch.dtype | None = None, block: tuple[int, int, int] | None = None):
    """y (B, K, Lp) with unit stride along Lp; weight (N, K) contiguous, of y's dtype; bias (N,) or
    None; residual (B, Lp, N) with unit stride along N, or None -> (normed (B, Lp, N) in out_dtype
    or else norm_weight's dtype, the new residual (B, Lp, N) fp32)."""
    if y.ndim != 3 or y.stride(2) != 1:
        raise ValueError(f"out_proj_add_rms_norm: y must be (B, K, Lp) with unit stride along Lp, "
                         f"got shape {tuple(y.shape)} strides {y.stride()}")
    batch, k, padded = y.shape
    if weight.ndim != 2 or weight.shape[1] != k or not weight.is_contiguous() or weight.dtype != y.dtype:
        raise ValueError(f"out_proj_add_rms_norm: weight must be contiguous (N, {k}) of {y.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"out_proj_add_rms_norm: bias must be contiguous ({n},) or None, got {tuple(bias.shape)}")
    if residual is not None and (residual.shape != (batch, padded, n) or residual.stride(2) != 1):
        raise ValueError(f"out_proj_add_rms_norm: residual must be {(batch, padded, n)} with unit stride along "
                         f"the features, got {tuple(residual.shape)} strides {residual.stride()}")
    if norm_weight.shape != (n,) or not norm_weight.is_contiguous():
        raise ValueError(f"out_proj_add_rms_norm: norm_weight must be contiguous ({n},), got "
                         f"{tuple(norm_weight.shape)}")
    out_dtype = out_dtype or norm_weight.dtype
    out = torch.empty(batch, padded, n, device=y.device, dtype=out_dtype)
    r_out = torch.empty(batch, padded, n, device=y.device, dtype=torch.float32)
    block_m, block_k, warps = block or (16, 64, 4)  # not yet tuned on a GPU (tune_vim.py --parts outnorm)
    interpret = _interpreting()
    launch(_out_proj_add_rms_norm_kernel, (batch, cdiv(padded, block_m)),
           [y, weight, bias if bias is not None else weight, residual if residual is not None else r_out,
            norm_weight, out, r_out, padded, k, n, eps, y.stride(0), y.stride(1),
            residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0],
           dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                ROUND_TO_WEIGHT=out_dtype != norm_weight.dtype, WIDEN=interpret, BLOCK_M=block_m,
                BLOCK_K=block_k, BLOCK_N=max(16, next_power_of_2(n)), num_warps=warps))
    return out, r_out


def out_proj_add_rms_norm_ref(y, weight, bias, residual, norm_weight, eps, out_dtype=None):
    """The reference: out_proj in fp32 rounded to y's dtype, the add in fp32, then RMSNorm with
    `add_rms_norm`'s roundings; (normed, new residual fp32), both (B, Lp, N)."""
    h = torch.matmul(y.float().transpose(1, 2), weight.float().t())  # (B, Lp, N)
    if bias is not None:
        h = h + bias.float()
    r = h.to(y.dtype).float()
    if residual is not None:
        r = r + residual.float()
    x = r.to(norm_weight.dtype).float()
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    out_dtype = out_dtype or norm_weight.dtype
    if out_dtype != norm_weight.dtype:
        out = out.to(norm_weight.dtype)
    return out.to(out_dtype), r
