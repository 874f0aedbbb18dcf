"""Δ = softplus(W x + bias) over whole sequences: Mamba's dt projection with its bias and softplus
fused, for the inference paths that hand the scan a finished Δ.

The projection's K is the dt rank (12 for Vim-Ti, d_model / 16 in general), so each (channels,
steps) tile is one tensor-core product with K padded to 16 by masked (zero) loads. The softplus
runs in the epilogue: in a kernel bound by writing Δ, its two special-function operations a
value cost little, while in the scan, which is bound by its special-function unit (exp(ΔA) for
every state), they cost 2 of every 20 (H200 profile in BENCHMARKS.md). Δ is rounded once, after
the softplus, to the output's dtype.

The readable reference is `dt_softplus_ref` beside it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import _interpreting
from .host import cdiv, next_power_of_2
from .launch import launch
from .selective_scan import _softplus


@triton.jit
def _dt_softplus_kernel(w_ptr, x_ptr, bias_ptr, out_ptr, dim, L, K,
                        s_xb, s_xk, s_ob, s_od,
                        HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_K: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr):
    """One (BLOCK_D, BLOCK_L) tile of Δ for one sequence: W (dim, K) @ x (K, L) on the tensor
    cores, + bias, softplus, stored with time contiguous."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    k = tl.arange(0, BLOCK_K)
    mask_d, mask_t, mask_k = d < dim, t < L, k < K
    w = tl.load(w_ptr + d[:, None] * K + k[None, :], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
    x = tl.load(x_ptr + b * s_xb + k[:, None] * s_xk + t[None, :], mask=mask_k[:, None] & mask_t[None, :],
                other=0.0)  # (BLOCK_K, BLOCK_L)
    if IEEE:  # fp32 operands: a full-precision product, not TF32
        acc = tl.dot(w, x, input_precision="ieee")  # (BLOCK_D, BLOCK_L) fp32
    else:
        acc = tl.dot(w, x)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    dt = _softplus(acc, FAST)
    out = out_ptr + b * s_ob + d[:, None].to(tl.int64) * s_od + t[None, :]
    tl.store(out, dt.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])


def dt_softplus(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None = None, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """weight (D, K), x (B, K, L) with unit stride along L, bias (D,) or None -> Δ (B, D, L) in x's
    dtype (or `out`'s, which must have unit stride along L): softplus(weight @ x + bias), the
    product accumulated in fp32."""
    if weight.ndim != 2 or not weight.is_contiguous():
        raise ValueError(f"dt_softplus: weight must be contiguous (D, K), got shape {tuple(weight.shape)}")
    if x.ndim != 3 or x.shape[1] != weight.shape[1] or x.stride(2) != 1:
        raise ValueError(f"dt_softplus: x must be (B, K={weight.shape[1]}, L) with unit stride along L, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype != weight.dtype:
        raise ValueError(f"dt_softplus: x is {x.dtype} and weight {weight.dtype}; they must match")
    dim, k = weight.shape
    batch, _, length = x.shape
    if bias is not None and (bias.shape != (dim,) or not bias.is_contiguous()):
        raise ValueError(f"dt_softplus: bias must be contiguous ({dim},) or None, got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty(batch, dim, length, device=x.device, dtype=x.dtype)
    elif out.shape != (batch, dim, length) or out.stride(2) != 1:
        raise ValueError(f"dt_softplus: out must be {(batch, dim, length)} with unit stride along L, "
                         f"got shape {tuple(out.shape)} strides {out.stride()}")
    # (channels, steps, warps) from the H200 at Vim-Ti's 1024-px shape: 128 x 64 x 4 0.091 ms,
    # 128 x 128 x 4 0.158 (220 registers), 128 x 128 x 8 0.133; a sweep's override otherwise
    block_d, block_l, warps = block or (min(128, max(16, next_power_of_2(dim))), 64, 4)
    grid = (batch, cdiv(length, block_l), cdiv(dim, block_d))
    launch(_dt_softplus_kernel, grid,
           [weight, x, bias if bias is not None else weight, out, dim, length, k,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1)],
           dict(HAS_BIAS=bias is not None, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=max(16, next_power_of_2(k)),
                IEEE=x.dtype == torch.float32, FAST=not _interpreting(), num_warps=warps))
    return out


def dt_softplus_ref(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference of `dt_softplus`, in fp32: softplus(weight @ x + bias), (B, D, L)."""
    dt = torch.matmul(weight.float(), x.float())
    if bias is not None:
        dt = dt + bias.float()[:, None]
    return F.softplus(dt)
