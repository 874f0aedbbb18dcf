"""The Triton causal conv1d as `torch.library` custom ops with fake tensors and autograd."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..recording import records_grad
from . import causal_conv1d as kernels

_EMPTY = (0,)


@torch.library.custom_op("mambakit::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      cu_seqlens: Optional[Tensor], silu: bool) -> Tensor:
    return kernels.conv_fwd(x, weight, bias, initial_state, silu, cu_seqlens)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("mambakit::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      cu_seqlens: Optional[Tensor], silu: bool, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dw, dbias, dinit = kernels.conv_bwd(x, weight, bias, initial_state, silu, cu_seqlens, dy)
    empty = lambda: x.new_empty(_EMPTY, dtype=torch.float32)  # noqa: E731 (outputs must not alias)
    return dx, dw, dbias if dbias is not None else empty(), dinit if dinit is not None else empty()


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, initial_state, cu_seqlens, silu, dy):
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(x.shape), weight.new_empty(weight.shape, **f32),
            bias.new_empty(bias.shape, **f32) if bias is not None else x.new_empty(_EMPTY, **f32),
            initial_state.new_empty(initial_state.shape, **f32) if initial_state is not None
            else x.new_empty(_EMPTY, **f32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, cu_seqlens, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
    dx, dw, dbias, dinit = causal_conv1d_bwd(x, weight, bias, initial_state, cu_seqlens, ctx.silu, dy)
    return (dx.to(x.dtype), dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else None,
            dinit.to(initial_state.dtype) if initial_state is not None else None, None, None)


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


def final_conv_state(x, width, initial_state, cu_seqlens):
    """The last K-1 inputs of each sequence (from the initial state where a sequence is shorter)."""
    if cu_seqlens is None:
        if x.shape[-1] >= width - 1:  # the last K-1 inputs, without copying the whole sequence
            return x[..., x.shape[-1] - (width - 1):].contiguous()
        past = x.new_zeros(x.shape[0], x.shape[1], width - 1) if initial_state is None else initial_state.to(x.dtype)
        return torch.cat([past, x], dim=-1)[..., x.shape[-1]:]
    finals = []
    offsets = cu_seqlens.tolist()
    for s, (a, e) in enumerate(zip(offsets, offsets[1:])):
        past = (x.new_zeros(1, x.shape[1], width - 1) if initial_state is None
                else initial_state[s:s + 1].to(x.dtype))
        finals.append(torch.cat([past, x[..., a:e]], dim=-1)[..., e - a:])
    return torch.cat(finals, dim=0)


def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False,
                         cu_seqlens=None):
    """Same results as `causal_conv1d_ref`; with cu_seqlens (batch 1), initial_state is (S, D, K-1)."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if records_grad(x, weight, bias, initial_state) or torch.compiler.is_compiling():
        y = causal_conv1d_fwd(x, weight, bias, initial_state, cu_seqlens, activation is not None)
    else:  # inference: the launcher directly, without the custom op's dispatch (see scan_op._scan)
        y = kernels.conv_fwd(x, weight, bias, initial_state, activation is not None, cu_seqlens)
    if not return_final_state:
        return y
    return y, final_conv_state(x, weight.shape[1], initial_state, cu_seqlens)
