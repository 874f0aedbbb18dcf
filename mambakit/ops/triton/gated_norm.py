"""Mamba-2's gated, grouped RMSNorm as one forward and one backward kernel (the torch version
is five element-wise passes forward and about ten backward over (rows, dim)).

    default:           y = rmsnorm(x · SiLU(z)) · w
    norm_before_gate:  y = rmsnorm(x) · w · SiLU(z)
each group of `group_size` channels normalised on its own, in fp32. The forward keeps 1/rms per
(row, group) for the backward. The readable reference is `ops.reference.gated_rms_norm_ref`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_grad(z):
    sig = tl.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _gated_norm_fwd_kernel(X, Z, W, Y, RSTD, n_rows, dim, group_size, eps, s_x, s_z, s_y,
                           HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    # grid (n_rows, n_groups)
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < group_size
    x = tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + row * s_z + cols, mask=ok, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / group_size + eps)
    tl.store(RSTD + row * (dim // group_size) + group, rstd)
    y = x * rstd * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(Y + row * s_y + cols, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gated_norm_bwd_kernel(X, Z, W, DY, RSTD, DX, DZ, DW, n_rows, dim, group_size, rows_per_program,
                           s_x, s_z, s_dy, s_dx, s_dz,
                           HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    # grid (cdiv(n_rows, rows_per_program), n_groups); DW: (programs along rows, dim) fp32 partial sums
    block = tl.program_id(0)
    group = tl.program_id(1)
    cols = group * group_size + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < group_size
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    n_groups = dim // group_size
    for i in range(rows_per_program):
        row = (block * rows_per_program + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * s_dy + cols, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row * n_groups + group)
            if HAS_Z:
                z = tl.load(Z + row * s_z + cols, mask=ok, other=0.0).to(tl.float32)
                gate, dgate = _silu_and_grad(z)
                if NORM_BEFORE_GATE:
                    normed = x * rstd
                    dz = dy * normed * w * dgate
                    dy = dy * gate
                else:
                    h = x * gate
                    normed = h * rstd
            else:
                normed = x * rstd
            dn = dy * w
            dw += dy * normed
            dh = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / group_size))
            if HAS_Z:
                if NORM_BEFORE_GATE:
                    tl.store(DZ + row * s_dz + cols, dz.to(DZ.dtype.element_ty), mask=ok)
                    tl.store(DX + row * s_dx + cols, dh.to(DX.dtype.element_ty), mask=ok)
                else:
                    tl.store(DZ + row * s_dz + cols, (dh * x * dgate).to(DZ.dtype.element_ty), mask=ok)
                    tl.store(DX + row * s_dx + cols, (dh * gate).to(DX.dtype.element_ty), mask=ok)
            else:
                tl.store(DX + row * s_dx + cols, dh.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW + block * dim + cols, dw, mask=ok)


def _rows(t):
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, t.shape[-1])


class GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate):
        shape, dim = x.shape, x.shape[-1]
        x2 = _rows(x)
        z2 = _rows(z) if z is not None else None
        n_rows, n_groups = x2.shape[0], dim // group_size
        y = torch.empty((n_rows, dim), device=x.device, dtype=x.dtype)
        rstd = torch.empty((n_rows, n_groups), device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(group_size)
        _gated_norm_fwd_kernel[(n_rows, n_groups)](
            x2, z2 if z2 is not None else x2, weight, y, rstd, n_rows, dim, group_size, float(eps),
            x2.stride(0), (z2 if z2 is not None else x2).stride(0), y.stride(0),
            HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=min(8, max(1, block // 256)))
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.meta = (shape, group_size, bool(norm_before_gate))
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        shape, group_size, norm_before_gate = ctx.meta
        n_rows, dim = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)
        dz = torch.empty_like(z2) if z2 is not None else None
        rows_per_program = max(1, min(64, n_rows // 1024))
        blocks = triton.cdiv(n_rows, rows_per_program)
        dw = torch.empty((blocks, dim), device=x2.device, dtype=torch.float32)
        block = triton.next_power_of_2(group_size)
        _gated_norm_bwd_kernel[(blocks, dim // group_size)](
            x2, z2 if z2 is not None else x2, weight, dy2, rstd, dx, dz if dz is not None else dx, dw,
            n_rows, dim, group_size, rows_per_program, x2.stride(0), (z2 if z2 is not None else x2).stride(0),
            dy2.stride(0), dx.stride(0), (dz if dz is not None else dx).stride(0),
            HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK=block,
            num_warps=min(8, max(1, block // 256)))
        return (dx.view(shape), dz.view(shape) if dz is not None else None, dw.sum(0).to(weight.dtype),
                None, None, None)


def gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate):
    """As ops.gated_rms_norm: x, z (..., dim); weight (dim,). Returns y (..., dim) in x's dtype."""
    return GatedRMSNormFn.apply(x, z, weight, eps, group_size, norm_before_gate)
