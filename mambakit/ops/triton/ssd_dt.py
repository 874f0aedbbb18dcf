"""The SSD's step sizes and their in-chunk cumulative sum, one Triton kernel each way (in torch it
is about seven element-wise kernels forward and as many backward, which short sequences notice):

    step = clamp(softplus(dt + dt_bias), lo, hi)      (batch, H, c, T), 0 past L
    cs   = in-chunk cumsum of step · A               (batch, H, c, T)

from dt (batch, L, H): both in the chunked layout the kernels read, a head's chunk contiguous.

The backward takes the gradients of step and cs: a reverse in-chunk cumsum gives the gradient of
step · A, then the chain through the limit, softplus and bias; dA and d(dt_bias) are summed with
atomics. The torch form is `ssd.step_sizes` followed by a cumsum (triton/ssd_op.py's fallback)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .helpers import softplus

_BLOCK_H = 16


@triton.jit
def _raw_and_step(DT, BIAS, b, pos, offs_h, ok, L, H, s_db, s_dl, lo, hi,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr):
    raw = tl.load(DT + b * s_db + pos[:, None] * s_dl + offs_h[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(BIAS + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)[None, :]
    step = softplus(raw, False) if SOFTPLUS else raw
    if LIMIT:
        step = tl.minimum(tl.maximum(step, lo), hi)
    return raw, tl.where(ok, step, 0.0)


@triton.jit
def _tile(LENGTHS, L, T, n_chunks, H, HAS_LENGTHS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """A program's (batch, chunk) and heads: grid (batch * c, cdiv(H, BLOCK_H)). ok: the steps
    within the chunk and within the row's own length (a padded batch of packed sequences);
    slots: the (BLOCK_T, BLOCK_H) offsets of the tile in the chunked (batch, H, c, T) layout."""
    pid, pid_h = tl.program_id(0), tl.program_id(1)
    c = pid % n_chunks
    b = (pid // n_chunks).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = c * T + offs_t
    end = tl.load(LENGTHS + b) if HAS_LENGTHS else L
    ok = ((offs_t < T) & (pos < end))[:, None] & (offs_h < H)[None, :]
    slots = ((b * H + offs_h[None, :]) * n_chunks + c) * T + offs_t[:, None]
    return b, c, offs_t, offs_h, pos, ok, slots


@triton.jit
def _dt_cumsum_fwd_kernel(DT, BIAS, A, STEP, CS, LENGTHS, L, T, n_chunks, H, s_db, s_dl, lo, hi,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (batch * c, cdiv(H, BLOCK_H)); STEP and CS (batch, H, c, T) fp32 (0 steps past L)
    b, c, offs_t, offs_h, pos, ok, slots = _tile(LENGTHS, L, T, n_chunks, H, HAS_LENGTHS, BLOCK_T, BLOCK_H)
    _, step = _raw_and_step(DT, BIAS, b, pos, offs_h, ok, L, H, s_db, s_dl, lo, hi, HAS_BIAS, SOFTPLUS, LIMIT)
    in_chunk = (offs_t < T)[:, None] & (offs_h < H)[None, :]
    tl.store(STEP + slots, step, mask=in_chunk)  # step is 0 past a row's length
    a = tl.load(A + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
    cs = tl.cumsum(step * a[None, :], axis=0)  # (BLOCK_T, BLOCK_H)
    tl.store(CS + slots, cs, mask=in_chunk)


@triton.jit
def _dt_cumsum_bwd_kernel(DT, BIAS, A, DSTEP, DCS, DDT, DA, DBIAS, LENGTHS, L, T, n_chunks, H, s_db, s_dl,
                          s_ddb, s_ddl, lo, hi,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid as the forward; DDT (batch, L, H) with its own strides (DT may be a view into a wider
    # projection, DDT is dense); DA, DBIAS (H,) fp32, added to
    b, c, offs_t, offs_h, pos, ok, slots = _tile(LENGTHS, L, T, n_chunks, H, HAS_LENGTHS, BLOCK_T, BLOCK_H)
    ok_h = offs_h < H
    raw, step = _raw_and_step(DT, BIAS, b, pos, offs_h, ok, L, H, s_db, s_dl, lo, hi, HAS_BIAS, SOFTPLUS, LIMIT)
    in_chunk = (offs_t < T)[:, None] & ok_h[None, :]
    dcs = tl.load(DCS + slots, mask=in_chunk, other=0.0)
    # the gradient of step_s · A is the sum of dcs_t over t >= s (cs_t sums the steps up to t)
    d_da = tl.sum(dcs, axis=0)[None, :] - tl.cumsum(dcs, axis=0) + dcs
    a = tl.load(A + offs_h, mask=ok_h, other=0.0).to(tl.float32)
    tl.atomic_add(DA + offs_h, tl.sum(tl.where(ok, step * d_da, 0.0), axis=0), mask=ok_h)
    grad = tl.load(DSTEP + slots, mask=ok, other=0.0)
    grad += a[None, :] * d_da
    if LIMIT:
        unclamped = softplus(raw, False) if SOFTPLUS else raw
        grad = tl.where((unclamped >= lo) & (unclamped <= hi), grad, 0.0)
    if SOFTPLUS:
        grad = tl.where(raw > 20.0, grad, grad * tl.sigmoid(raw))  # torch's softplus is x itself above 20
    grad = tl.where(ok, grad, 0.0)
    in_rows = ((offs_t < T) & (pos < L))[:, None] & ok_h[None, :]  # past a row's length: 0
    tl.store(DDT + b * s_ddb + pos[:, None] * s_ddl + offs_h[None, :], grad.to(DDT.dtype.element_ty), mask=in_rows)
    if HAS_BIAS:
        tl.atomic_add(DBIAS + offs_h, tl.sum(grad, axis=0), mask=ok_h)


class StepCumsum(torch.autograd.Function):
    """(dt, A, dt_bias) -> (step, cs), both (batch, H, c, T) fp32: each head's chunk of steps
    contiguous, as the kernels read them; with lengths (batch,) int, the steps of row b past
    lengths[b] are 0 (and so are the last chunk's past L)."""

    @staticmethod
    def forward(ctx, dt, A, dt_bias, softplus_, dt_limit, chunk_size, lengths=None):
        dt = dt if dt.stride(-1) == 1 else dt.contiguous()
        batch, length, heads = dt.shape
        T = chunk_size
        n_chunks = -(-length // T)
        step = dt.new_empty((batch, heads, n_chunks, T), dtype=torch.float32)  # cs's layout: a head's chunk contiguous
        cs = dt.new_empty((batch, heads, n_chunks, T), dtype=torch.float32)
        lo, hi = float(dt_limit[0]), float(dt_limit[1])
        meta = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus_), LIMIT=(lo, hi) != (0.0, math.inf),
                    HAS_LENGTHS=lengths is not None, BLOCK_T=triton.next_power_of_2(T), BLOCK_H=_BLOCK_H)
        _dt_cumsum_fwd_kernel[(batch * n_chunks, triton.cdiv(heads, _BLOCK_H))](
            dt, dt_bias if dt_bias is not None else A, A, step, cs, lengths if lengths is not None else A, length, T, n_chunks, heads,
            dt.stride(0), dt.stride(1), lo, min(hi, 3.0e38), **meta)
        ctx.save_for_backward(dt, A, dt_bias, lengths)
        ctx.args = (T, n_chunks, lo, min(hi, 3.0e38), meta)
        return step, cs

    @staticmethod
    def backward(ctx, dstep, dcs):
        dt, A, dt_bias, lengths = ctx.saved_tensors
        T, n_chunks, lo, hi, meta = ctx.args
        batch, length, heads = dt.shape
        dstep = dt.new_zeros((batch, heads, n_chunks, T), dtype=torch.float32) if dstep is None else dstep.contiguous()
        dcs = dt.new_zeros((batch, heads, n_chunks, T), dtype=torch.float32) if dcs is None else dcs.contiguous()
        ddt = torch.empty(dt.shape, device=dt.device, dtype=dt.dtype)  # every element is written
        dA = torch.zeros(heads, device=dt.device, dtype=torch.float32)
        dbias = torch.zeros(heads, device=dt.device, dtype=torch.float32) if dt_bias is not None else None
        _dt_cumsum_bwd_kernel[(batch * n_chunks, triton.cdiv(heads, _BLOCK_H))](
            dt, dt_bias if dt_bias is not None else A, A, dstep, dcs, ddt, dA, dbias if dbias is not None else dA,
            lengths if lengths is not None else A, length, T, n_chunks, heads, dt.stride(0), dt.stride(1),
            ddt.stride(0), ddt.stride(1), lo, hi, **meta)
        return (ddt, dA.to(A.dtype), dbias.to(dt_bias.dtype) if dbias is not None else None, None, None, None, None)
