"""x_proj and Δ from one read of u: Mamba's input-dependent projections for the inference paths
that hand the scan a finished Δ.

    x_dbl = W_x u                         (R + 2N rows a step: dt's low rank R, then B, then C)
    Δ     = softplus(W_dt x_dbl[:R] + b)  (D rows a step)

Each program owns a block of steps of one sequence, makes all R + 2N rows on the tensor cores
from the D channels of u (read once), writes only B and C, and goes on from its dt rows, still
in registers, to Δ for every channel. The dt rows are rounded once to u's dtype, as x_proj's
output would be. It replaced x_proj as a batched GEMM writing x_dbl followed by a dt kernel
reading its first R rows back: on the H200 at Vim-Ti's 1024-px layer 0.150 against 0.153 ms for
the two (Nsight Compute: latency-bound, issue 63 %, DRAM 48 %), with one launch and one
(B, R + 2N, L) buffer fewer a direction.

The softplus runs in the epilogue: its two special-function operations a value cost little
here, while in the scan, bound by its special-function unit (exp(ΔA) for every state), they
would cost 2 of every 18.

B and C are written to a (B, 2N, L) buffer, B's rows first, with time contiguous: the scan reads
them with a fixed state stride (its `fixed_bc_stride`). Δ is (B, D, L), time contiguous.

The readable reference is `x_proj_delta_ref` beside it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..backend import interpreting
from .host import cdiv, next_power_of_2
from .launch import launch
from .helpers import softplus


@triton.jit
def _rows_times_u(w_ptr, row0, n_rows, u, kk, mask_k, dim, acc, BLOCK_ROWS: tl.constexpr, IEEE: tl.constexpr,
                  WIDEN: tl.constexpr):
    """acc + W[row0:row0 + n_rows, kk] @ u: (BLOCK_ROWS, BLOCK_K) @ (BLOCK_K, BLOCK_L), rows past
    n_rows read as zero."""
    rows = tl.arange(0, BLOCK_ROWS)
    w = tl.load(w_ptr + (row0 + rows)[:, None] * dim + kk[None, :], mask=(rows < n_rows)[:, None] & mask_k[None, :],
                other=0.0)  # (BLOCK_ROWS, BLOCK_K)
    if WIDEN:  # the interpreter's bf16 products are wrong: take them in fp32
        w = w.to(tl.float32)
    if IEEE:
        return tl.dot(w, u, acc, input_precision="ieee")
    return tl.dot(w, u, acc)


@triton.jit
def _x_proj_delta_kernel(u_ptr, wx_ptr, wdt_ptr, bias_ptr, delta_ptr, bc_ptr, dim, L, R, N,
                         s_ub, s_ud, s_db, s_dd, s_cb, s_cn,
                         HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         IEEE: tl.constexpr, WIDEN: tl.constexpr, FAST: tl.constexpr):
    """BLOCK_L steps of one sequence: x_dbl's R + 2N rows from all `dim` channels of u, then Δ for
    every channel in blocks of BLOCK_D."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    mask_t = t < L
    acc_r = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)  # dt's low-rank rows
    acc_b = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    u_rows = u_ptr + b * s_ub + t[None, :]
    for k0 in range(0, dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < dim
        u = tl.load(u_rows + kk[:, None].to(tl.int64) * s_ud, mask=mask_k[:, None] & mask_t[None, :],
                    other=0.0)  # (BLOCK_K, BLOCK_L)
        if WIDEN:
            u = u.to(tl.float32)
        acc_r = _rows_times_u(wx_ptr, 0, R, u, kk, mask_k, dim, acc_r, BLOCK_R, IEEE, WIDEN)
        acc_b = _rows_times_u(wx_ptr, R, N, u, kk, mask_k, dim, acc_b, BLOCK_N, IEEE, WIDEN)
        acc_c = _rows_times_u(wx_ptr, R + N, N, u, kk, mask_k, dim, acc_c, BLOCK_N, IEEE, WIDEN)
    n = tl.arange(0, BLOCK_N)
    m_bc = (n < N)[:, None] & mask_t[None, :]
    bc_rows = bc_ptr + b * s_cb + n[:, None] * s_cn + t[None, :]  # (BLOCK_N, BLOCK_L)
    tl.store(bc_rows, acc_b.to(bc_ptr.dtype.element_ty), mask=m_bc)
    tl.store(bc_rows + N * s_cn, acc_c.to(bc_ptr.dtype.element_ty), mask=m_bc)
    dt_low = acc_r.to(u_ptr.dtype.element_ty)  # (BLOCK_R, BLOCK_L): x_proj's output rounding
    if WIDEN:
        dt_low = dt_low.to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_d = d < dim
        w = tl.load(wdt_ptr + d[:, None] * R + r[None, :], mask=mask_d[:, None] & (r < R)[None, :],
                    other=0.0)  # (BLOCK_D, BLOCK_R)
        if WIDEN:
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, dt_low, input_precision="ieee")  # (BLOCK_D, BLOCK_L) fp32
        else:
            acc = tl.dot(w, dt_low)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        out = delta_ptr + b * s_db + d[:, None].to(tl.int64) * s_dd + t[None, :]
        tl.store(out, softplus(acc, FAST).to(delta_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_t[None, :])


def x_proj_delta(u: torch.Tensor, x_proj_weight: torch.Tensor, dt_weight: torch.Tensor, dt_bias: torch.Tensor | None,
                 d_state: int, delta_out: torch.Tensor | None = None, bc_out: torch.Tensor | None = None,
                 block: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """u (B, D, L) with unit stride along L; x_proj_weight (R + 2N, D) and dt_weight (D, R), both
    contiguous in u's dtype; dt_bias (D,) or None. Returns Δ (B, D, L) after its softplus and
    B and C as one (B, 2N, L) tensor (B's rows first), in u's dtype or the given outputs' (unit
    stride along L). `block` = (BLOCK_L, BLOCK_K, BLOCK_D, warps[, pipeline stages]) overrides the
    tile."""
    if u.ndim != 3 or u.stride(2) != 1:
        raise ValueError(f"x_proj_delta: u must be (B, D, L) with unit stride along L, got shape {tuple(u.shape)} "
                         f"strides {u.stride()}")
    batch, dim, length = u.shape
    rank = x_proj_weight.shape[0] - 2 * d_state if x_proj_weight.ndim == 2 else -1
    if x_proj_weight.ndim != 2 or x_proj_weight.shape[1] != dim or rank < 1 or not x_proj_weight.is_contiguous():
        raise ValueError(f"x_proj_delta: x_proj_weight must be contiguous (R + 2*d_state, D={dim}) with R >= 1, "
                         f"got shape {tuple(x_proj_weight.shape)} (d_state {d_state})")
    if dt_weight.shape != (dim, rank) or not dt_weight.is_contiguous():
        raise ValueError(f"x_proj_delta: dt_weight must be contiguous (D, R) = {(dim, rank)}, "
                         f"got {tuple(dt_weight.shape)}")
    if x_proj_weight.dtype != u.dtype or dt_weight.dtype != u.dtype:
        raise ValueError(f"x_proj_delta: u is {u.dtype}, x_proj_weight {x_proj_weight.dtype} and dt_weight "
                         f"{dt_weight.dtype}; they must match")
    if dt_bias is not None and (dt_bias.shape != (dim,) or not dt_bias.is_contiguous()):
        raise ValueError(f"x_proj_delta: dt_bias must be contiguous ({dim},) or None, got {tuple(dt_bias.shape)}")
    delta = _output(delta_out, "delta_out", (batch, dim, length), u)
    bc = _output(bc_out, "bc_out", (batch, 2 * d_state, length), u)
    # (steps, channels a product step, Δ rows a step, warps), from the H200 at Vim-Ti's 1024-px shape
    # (benchmarks/tuning/tune_vim.py --parts xproj): 64 x 64 x 64 x 4 0.150 ms, 64 x 64 x 128 x 4 0.151,
    # 128 x 64 x 64 x 4 0.150, 128 x 64 x 128 x 4 0.198, 32 x 64 x 128 x 4 0.173
    block_l, block_k, block_d, warps, *stages = block or (64, 64, 64, 4)
    grid = (batch, cdiv(length, block_l))
    on_cpu = interpreting()
    launch(_x_proj_delta_kernel, grid,
           [u, x_proj_weight, dt_weight, dt_bias if dt_bias is not None else dt_weight, delta, bc, dim, length,
            rank, d_state, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), bc.stride(0), bc.stride(1)],
           dict(HAS_BIAS=dt_bias is not None, BLOCK_L=block_l, BLOCK_K=min(block_k, max(16, next_power_of_2(dim))),
                BLOCK_D=min(block_d, max(16, next_power_of_2(dim))), BLOCK_R=max(16, next_power_of_2(rank)),
                BLOCK_N=max(16, next_power_of_2(d_state)), IEEE=u.dtype == torch.float32,
                WIDEN=on_cpu and u.dtype != torch.float32, FAST=not on_cpu, num_warps=warps,
                **({"num_stages": stages[0]} if stages else {})))
    return delta, bc


def _output(out: torch.Tensor | None, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if out.shape != shape or out.stride(2) != 1:
        raise ValueError(f"x_proj_delta: {name} must be {shape} with unit stride along L, got shape "
                         f"{tuple(out.shape)} strides {out.stride()}")
    return out


def x_proj_delta_ref(u: torch.Tensor, x_proj_weight: torch.Tensor, dt_weight: torch.Tensor,
                     dt_bias: torch.Tensor | None, d_state: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `x_proj_delta`, in fp32 but for x_dbl's dt rows, rounded to u's dtype as
    x_proj's output is: (Δ (B, D, L), B and C (B, 2N, L))."""
    rank = x_proj_weight.shape[0] - 2 * d_state
    x_dbl = torch.matmul(x_proj_weight.float(), u.float())  # (B, R + 2N, L)
    dt_low = x_dbl[:, :rank].to(u.dtype).float()
    dt = torch.matmul(dt_weight.float(), dt_low)  # (B, D, L)
    if dt_bias is not None:
        dt = dt + dt_bias.float()[:, None]
    return F.softplus(dt), x_dbl[:, rank:]
