"""A Mamba mixer's causal conv, x_proj and selective scan as one training Function that keeps
the conv's input for the backward, not its output, and runs the conv again there.

The composition (conv -> x_proj -> split -> selective_scan_dt_proj) holds the conv output u
(B, D, L) from the forward to the backward: x_proj's weight gradient and the scan's backward
both need it. Here the backward forms u again from the conv input x, which the composition
holds anyway (the conv's own backward needs it), at the cost of one conv pass. Per layer of the
130m model at 8 x 2048 that is 50 MB less held. The readable composition is
`mambakit.ops.conv_proj_scan` with any other backend, or with this one outside eager training,
and tests/test_conv_proj_scan.py compares the two."""

from __future__ import annotations

import torch

from ..recording import records_grad
from ..reference import batched_linear
from . import causal_conv1d as conv_kernels
from . import scan_op
from .host import as_dtype
from .scan_launch import scan_bwd, scan_fwd


class _EagerConvProjScan(torch.autograd.Function):
    """x: the conv input (B, D, L), or with gate_in_x the in_proj output xz (B, 2D, L) whose
    second half is the gate z. Then the backward writes dz and dx into one gradient laid out as
    xz is: no concatenation of dx and dz, and no copy into in_proj's layout afterwards."""

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias, cu_seqlens,
                gate_in_x):
        n = A.shape[1]
        xc, z = _conv_input_and_gate(x, z, conv_weight.shape[0], gate_in_x)  # (B, D, L) each
        u = conv_kernels.conv_fwd(xc, conv_weight, conv_bias, None, True, cu_seqlens)  # (B, D, L), x's dtype
        x_dbl = batched_linear(x_proj_weight, u)  # (B, R + 2N, L)
        dt, B, C = x_dbl.split([x_dbl.shape[1] - 2 * n, n, n], dim=1)
        delta = batched_linear(dt_proj_weight, dt)  # (B, D, L), freed when the forward returns
        out, _, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, None, True, cu_seqlens, True)
        ctx.save_for_backward(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, x_dbl, A, D,
                              None if gate_in_x else z, delta_bias, cu_seqlens, states)
        # the dtypes the two projections ran in (bf16 under autocast): the backward, which runs
        # without autocast, casts to them, so that it forms the forward's Δ and x_proj's operands
        ctx.delta_dtype = delta.dtype
        ctx.gate_in_x = gate_in_x
        return out

    @staticmethod
    def backward(ctx, dout):
        x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, x_dbl, A, D, z, delta_bias, cu_seqlens, states = (
            ctx.saved_tensors)
        n, dim = A.shape[1], conv_weight.shape[0]
        xc, z = _conv_input_and_gate(x, z, dim, ctx.gate_in_x)
        # with the gate in x: x's gradient in x's own layout (empty_like keeps a dense view's
        # strides), the scan writing du and dz into its halves, and dx then going over du
        dxz = torch.empty_like(x) if ctx.gate_in_x else None
        u = conv_kernels.conv_fwd(xc, conv_weight, conv_bias, None, True, cu_seqlens)  # the forward's u, again
        dt, B, C = x_dbl.split([x_dbl.shape[1] - 2 * n, n, n], dim=1)
        dt_c, w_dt = dt.to(ctx.delta_dtype), dt_proj_weight.to(ctx.delta_dtype)
        delta = batched_linear(w_dt, dt_c)  # the forward's Δ, again
        du, ddelta, dA, dB, dC, dD, dz, dbias, _ = scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, cu_seqlens, True, states, dout, None,
            grads_out=None if dxz is None else (dxz[:, :dim], dxz[:, dim:]))
        del delta
        batch = x.shape[0]
        # Δ = W_dt dt: d(dt) = W_dt^T dΔ (B, R, L); dW_dt = Σ_b dΔ dt^T, summed over the batch in fp32
        d_dt = torch.bmm(w_dt.t().expand(batch, -1, -1), ddelta)
        d_w_dt = torch.bmm(ddelta, dt_c.transpose(1, 2)).sum(0, dtype=torch.float32)
        del ddelta
        # x_dbl = W_x u: du += W_x^T d(x_dbl), in place; dW_x = Σ_b d(x_dbl) u^T
        d_xdbl = torch.cat([d_dt.to(x_dbl.dtype), dB.to(x_dbl.dtype), dC.to(x_dbl.dtype)], dim=1)  # (B, R + 2N, L)
        w_x = x_proj_weight.to(x_dbl.dtype)
        u_c = u.to(x_dbl.dtype)
        du.baddbmm_(w_x.t().expand(batch, -1, -1).to(du.dtype), d_xdbl.to(du.dtype))
        d_w_x = torch.bmm(d_xdbl, u_c.transpose(1, 2)).sum(0, dtype=torch.float32)
        del u, u_c, d_xdbl
        # dx over du, which has x's dtype (the conv's output u has it; the conv reads du whole
        # before it writes dx)
        dx, d_conv_w, d_conv_b, _ = conv_kernels.conv_bwd(xc, conv_weight, conv_bias, None, True, cu_seqlens,
                                                          du, dx_out=du)
        if dxz is not None:
            dx, dz = _gathered(dxz, dim, dx, dz), None
        grads = (dx, d_conv_w, d_conv_b, d_w_x, d_w_dt, dA, dD, dz, dbias)
        inputs = (x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias)
        return tuple(None if t is None or g is None else as_dtype(g, t.dtype) for g, t in zip(grads, inputs)) + (
            None, None)


def _conv_input_and_gate(x, z, dim: int, gate_in_x: bool):
    """(the conv input (B, D, L), the gate z or None): x's halves with gate_in_x, else x and z."""
    return (x[:, :dim], x[:, dim:]) if gate_in_x else (x, z)


def _gathered(dxz, dim: int, dx, dz):
    """xz's gradient: dxz, into which the kernels wrote dx and dz where its layout let them (see
    scan_bwd's grads_out); a piece that came back elsewhere is copied in."""
    if dx.data_ptr() != dxz.data_ptr():
        dxz[:, :dim].copy_(dx)
    if dz.data_ptr() != dxz[:, dim:].data_ptr():
        dxz[:, dim:].copy_(dz)
    return dxz


def eager_training(inputs) -> bool:
    """Whether a call with these inputs trains eagerly: then _EagerConvProjScan runs it. Otherwise
    (inference, torch.compile's tracing) the composition of the Triton ops does."""
    return records_grad(*inputs) and scan_op.EAGER_FUNCTION and not torch.compiler.is_compiling()


def conv_proj_scan_triton(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D=None, z=None,
                          delta_bias=None, cu_seqlens=None, gate_in_x=False):
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    return _EagerConvProjScan.apply(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias,
                                    cu_seqlens, bool(gate_in_x))
