"""The Triton selective scan as `torch.library` custom ops, with fake-tensor support (so that
torch.compile traces through it) and autograd.

    mambakit::selective_scan_fwd(...) -> (out, final_state, chunk_states)
    mambakit::selective_scan_bwd(...) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit)

Optional tensors that the kernel does not take are passed as None; outputs that do not apply
come back as empty tensors (custom ops cannot return None)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..recording import records_grad
from ..reference import batched_linear
from .host import as_dtype
from .scan_launch import dbc_dtype, scan_bwd, scan_fwd
from .scan_plan import plan_scan

_EMPTY = (0,)


@torch.library.custom_op("mambakit::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                       cu_seqlens: Optional[Tensor], delta_softplus: bool, save_states: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    out, final, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                          cu_seqlens, save_states)
    return out, final, states if states is not None else u.new_empty(_EMPTY, dtype=torch.float32)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, save_states):
    batch, dim, length = u.shape
    n_seqs = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final = u.new_empty((n_seqs, dim, A.shape[1]), dtype=torch.float32)
    if save_states:
        plan = plan_scan(u, B, A, cu_seqlens, cached=False)
        states = u.new_empty((plan.state_rows, dim, A.shape[1]), dtype=plan.states_dtype)
    else:
        states = u.new_empty(_EMPTY, dtype=torch.float32)
    return u.new_empty(u.shape), final, states  # contiguous, as the kernel writes it


@torch.library.custom_op("mambakit::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], cu_seqlens: Optional[Tensor],
                       chunk_states: Tensor, dout: Tensor, dfinal: Optional[Tensor], delta_softplus: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = scan_bwd(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, chunk_states,
                             dout, dfinal)
    # a custom op's outputs may not alias each other: dA, dD, dΔ-bias (and dB, dC) are views of
    # one reduction, so they are copied here (the eager path, _EagerScan, keeps the views)
    return tuple(u.new_empty(_EMPTY, dtype=torch.float32) if g is None else g.clone() if g._base is not None else g
                 for g in grads)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, chunk_states, dout, dfinal, delta_softplus):
    f32 = dict(dtype=torch.float32)
    n_seqs = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dim, d_state = A.shape
    return (u.new_empty(u.shape), u.new_empty(u.shape, dtype=delta.dtype), A.new_empty(A.shape, **f32),
            B.new_empty(B.shape, dtype=dbc_dtype(B, C)), C.new_empty(C.shape, dtype=dbc_dtype(B, C)),
            D.new_empty(D.shape, **f32) if D is not None else u.new_empty(_EMPTY, **f32),
            u.new_empty(u.shape, dtype=z.dtype) if z is not None else u.new_empty(_EMPTY, **f32),
            delta_bias.new_empty(delta_bias.shape, **f32) if delta_bias is not None else u.new_empty(_EMPTY, **f32),
            u.new_empty((n_seqs, dim, d_state), **f32))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, save_states = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.has_init = initial_state is not None
    ctx.init_dtype = None if initial_state is None else initial_state.dtype



def _input_grads(ctx, dout, dfinal, bwd):
    """The gradients of (u, delta, A, B, C, D, z, delta_bias, initial_state) in their dtypes,
    None for absent inputs, from `bwd` (the custom op or the launcher itself)."""
    u, delta, A, B, C, D, z, delta_bias, cu_seqlens, states = ctx.saved_tensors
    if states.numel() == 0:
        raise RuntimeError("mambakit.selective_scan: backward through a forward run without save_states; "
                           "call it with gradients enabled")
    grads = bwd(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, states, dout, dfinal, ctx.delta_softplus)
    return _in_dtypes(grads, (u, delta, A, B, C, D, z, delta_bias), ctx)


def _in_dtypes(grads, inputs, ctx) -> tuple:
    """Each gradient in its input's dtype, None for an absent input (or a gradient not asked
    for); the last one is initial_state's (ctx.has_init, ctx.init_dtype)."""
    *grads, dinit = grads
    return tuple(None if t is None or g is None else as_dtype(g, t.dtype) for g, t in zip(grads, inputs)) + (
        as_dtype(dinit, ctx.init_dtype) if ctx.has_init else None,)


def _backward(ctx, dout, dfinal, _dstates):
    return _input_grads(ctx, dout, dfinal, selective_scan_bwd) + (None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _launch_bwd(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, states, dout, dfinal, delta_softplus):
    return scan_bwd(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, states, dout, dfinal)


class _EagerScan(torch.autograd.Function):
    """Eager training calls the same launchers as the custom ops without their dispatch. The
    dispatch (custom op -> autograd -> redispatch -> backend, forward and backward) costs a few
    hundred µs of host time a call, which bounded short scans: at (16, 512) a forward+backward
    took 1.25 ms of host time for 0.87 ms of GPU work (BENCHMARKS.md, the scan's host path).
    torch.compile still traces the custom ops (fake tensors, no graph breaks)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus):
        ctx.set_materialize_grads(False)  # an unused final state sends no zeros to the kernel
        out, final, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                              cu_seqlens, True)
        _setup_context(ctx, (u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, True),
                       (out, final, states))
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        if dout is None:
            dout = torch.zeros_like(ctx.saved_tensors[0])
        return _input_grads(ctx, dout, dfinal, _launch_bwd) + (None, None)


EAGER_FUNCTION = True  # False: eager training through the custom ops too (tests cover both paths)


def _scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, out=None):
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = records_grad(*inputs)
    if not save and not torch.compiler.is_compiling():
        # inference (prefill): the launcher directly, skipping the custom op's dispatch, which
        # costs tens of µs a call when a short prefill is bound by host overhead
        out, final, _ = scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                         cu_seqlens, False, out=out)
        return out, final
    if out is not None:  # torch.compile's tracing: the custom op, then a copy
        y, final = _scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus)
        return out.copy_(y), final
    if save and EAGER_FUNCTION and not torch.compiler.is_compiling():
        return _EagerScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                                bool(delta_softplus))
    out, final, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                                       bool(delta_softplus), save)
    return out, final


class _EagerScanDtProj(torch.autograd.Function):
    """The scan of Δ = batched_linear(dt_weight, dt) that saves the low-rank dt (B, R, L) for the
    backward instead of Δ (B, D, L), and forms Δ again there (one small GEMM): per layer of the
    130m model at 8 x 2048, 50 MB less held from forward to backward. The gradients are those of
    the composition batched_linear then the scan (tests/test_triton_scan_dt_proj.py)."""

    @staticmethod
    def forward(ctx, u, dt, dt_weight, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus):
        ctx.set_materialize_grads(False)
        delta = batched_linear(dt_weight, dt)  # (B, D, L), freed when the forward returns
        out, final, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                              cu_seqlens, True)
        ctx.save_for_backward(u, dt, dt_weight, A, B, C, D, z, delta_bias, cu_seqlens, states)
        # the dtype the projection ran in (bf16 under autocast, even for fp32 dt): the backward,
        # which runs without autocast, forms Δ again in it, so that it is the forward's Δ
        ctx.delta_dtype = delta.dtype
        ctx.delta_softplus = delta_softplus
        ctx.has_init = initial_state is not None
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        u, dt, dt_weight, A, B, C, D, z, delta_bias, cu_seqlens, states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        dt_c, weight_c = dt.to(ctx.delta_dtype), dt_weight.to(ctx.delta_dtype)  # as the forward's GEMM ran
        delta = batched_linear(weight_c, dt_c)  # the forward's Δ, formed again
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, cu_seqlens, ctx.delta_softplus, states, dout, dfinal)
        d_dt = d_weight = None
        if ctx.needs_input_grad[1]:  # Δ = W dt: d(dt) = W^T dΔ, (B, R, L)
            d_dt = torch.bmm(weight_c.t().expand(dt.shape[0], -1, -1), ddelta)
        if ctx.needs_input_grad[2]:  # dW = Σ_b dΔ dt^T, (D, R), the sum over the batch in fp32
            d_weight = torch.bmm(ddelta, dt_c.transpose(1, 2)).sum(0, dtype=torch.float32)
        return _in_dtypes((du, d_dt, d_weight, dA, dB, dC, dD, dz, dbias, dinit),
                          (u, dt, dt_weight, A, B, C, D, z, delta_bias), ctx) + (None, None)


def selective_scan_dt_proj_triton(u, dt, dt_weight, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                  initial_state=None, return_final_state=False, cu_seqlens=None):
    """selective_scan_triton(u, batched_linear(dt_weight, dt), ...): in eager training through
    _EagerScanDtProj (Δ not held for the backward), otherwise the composition itself."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    inputs = (u, dt, dt_weight, A, B, C, D, z, delta_bias, initial_state)
    save = records_grad(*inputs)
    if save and EAGER_FUNCTION and not torch.compiler.is_compiling():
        out, final = _EagerScanDtProj.apply(u, dt, dt_weight, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                                            bool(delta_softplus))
    else:
        out, final = _scan(u, batched_linear(dt_weight, dt), A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                           delta_softplus)
    return (out, final) if return_final_state else out


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False, cu_seqlens=None, out=None):
    """Same signature and results as `selective_scan_ref` (arguments already checked). Long
    sequences in small batches are cut into segments scanned in parallel inside the kernels
    (`scan_plan.segment_plan`). `out` (inference only, checked): written in place,
    and it may be u itself."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    out, final = _scan(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, out)
    return (out, final) if return_final_state else out
