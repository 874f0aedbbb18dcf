"""What the mixers share: the recurrent state of one layer (`MambaState`), its checks, the
input handling of a one-token decoding step, and `is_plain`, the one rule for when a fast path
may read a submodule's weights instead of calling it (with the calls that replace it otherwise).

Wrapped submodules: a fused path takes in_proj's, conv1d's, x_proj's, dt_proj's or out_proj's
weights only where `is_plain` says the module is exactly the class the mixer built, unhooked,
with plain tensor parameters. Anything else (a peft LoRA layer, a dynamically quantized Linear,
a parametrized module, a forward hook, a torchao tensor-subclass weight) is called, so what it
does to its input is what runs: `linear`, `linear_on_channels`, `causal_conv`, `causal_conv_step`
give the same math as the fused paths through the module's own forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from .. import ops


@dataclass
class MambaState:
    """The recurrent state of one mixer: what a Transformer's KV cache is, at a fixed size."""
    conv: torch.Tensor  # (B, D_inner, K-1): the last K-1 conv inputs
    ssm: torch.Tensor  # (B, D_inner, N) for Mamba-1, (B, H, P, N) for Mamba-2; fp32


class _MixerShape(Protocol):
    d_inner: int
    d_conv: int
    d_state: int


def sequence_input(mixer: str, hidden_states, d_model: int, cu_seqlens=None) -> tuple[int, int]:
    """A mixer's sequence input, (B, L, d_model), batch 1 with cu_seqlens -> (B, L), with a
    ValueError naming the mixer and the shape otherwise."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3 or hidden_states.shape[-1] != d_model:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
        raise ValueError(f"{mixer} expects hidden_states of shape (B, L, {d_model}), got {shape}")
    batch, length, _ = hidden_states.shape
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need hidden_states of batch 1, got batch {batch}")
    return batch, length


def one_token(hidden_states: torch.Tensor, d_model: int) -> tuple[torch.Tensor, bool]:
    """A mixer step's input, (B, d_model) or (B, 1, d_model) -> ((B, d_model), whether it had
    the length axis), with a ValueError naming the shape otherwise."""
    squeeze = hidden_states.ndim == 3
    if squeeze:
        if hidden_states.shape[1] != 1:
            raise ValueError(f"step() takes one token, got hidden_states of shape {tuple(hidden_states.shape)}")
        hidden_states = hidden_states[:, 0]
    if hidden_states.ndim != 2 or hidden_states.shape[-1] != d_model:
        raise ValueError(f"step() expects hidden_states of shape (B, {d_model}), got {tuple(hidden_states.shape)}")
    return hidden_states, squeeze


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for fp16 / bf16 / fp32 parameters; fp64 ones stay fp64 (a float64 model is exact)."""
    return t if t.dtype == torch.float64 else t.float()


def check_state(cache: MambaState, batch: int, mixer: _MixerShape) -> None:
    """A ValueError naming the shapes unless `cache` fits this mixer (its conv and SSM state) at `batch`."""
    want_conv = (batch, mixer.d_inner, mixer.d_conv - 1)
    want_ssm = (batch, mixer.d_inner, mixer.d_state)
    if tuple(cache.conv.shape) != want_conv or tuple(cache.ssm.shape) != want_ssm:
        raise ValueError(f"cache shapes conv {tuple(cache.conv.shape)} / ssm {tuple(cache.ssm.shape)} do not match "
                         f"this layer and batch: expected conv {want_conv} / ssm {want_ssm}")


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_GLOBAL_HOOKS = tuple(getattr(_nn_module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if hasattr(_nn_module, name))


def is_plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether a fused path may read `module`'s weights instead of calling it: the module is
    exactly `cls` (not a subclass, a peft LoRA layer, a quantized or parametrized module), its
    parameters are plain tensors (not a tensor subclass such as torchao's quantized weights),
    and no hook would run on a call (its own forward / backward hooks, or global ones). When it
    is not, the mixers call the module, so that wrappers change what runs."""
    if type(module) is not cls:
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    if any(_GLOBAL_HOOKS):
        return False
    return all(type(p) in _PLAIN_TENSORS for p in module._parameters.values() if p is not None)


def conv_state_dtype(conv1d: nn.Module) -> torch.dtype:
    """The dtype of a mixer's cached conv state: its conv's floating-point parameters' (a
    wrapper's base weight's included), else the default dtype."""
    for p in conv1d.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear-like module over x's last axis: F.linear on its weight and bias where it is a
    plain nn.Linear (no module call's overhead, for the decoding step), else the call."""
    if is_plain(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    return module(x)


def linear_on_channels(module: nn.Module, x: torch.Tensor, contiguous_time: bool = False) -> torch.Tensor:
    """A Linear-like module called over the channels of x (B, C, L) -> (B, O, L), its bias
    included: a view of its (B, L, O) output, copied contiguous along L where `contiguous_time`
    (the channels-first layout of the Triton kernels)."""
    out = module(x.transpose(1, 2)).transpose(1, 2)  # (B, O, L)
    return out.contiguous() if contiguous_time else out


def causal_conv(conv1d: nn.Module, x: torch.Tensor, d_conv: int, initial_state: torch.Tensor | None = None,
                return_final_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """SiLU(causal depthwise conv1d(x)), x (B, D, L) -> y (B, D, L) [, final state (B or S, D, K-1)],
    as ops.causal_conv1d takes them: the fused op on conv1d's weight where it is a plain
    nn.Conv1d, else calls of the module (with the mixers' geometry: kernel d_conv, padding
    d_conv - 1), one per packed sequence with cu_seqlens."""
    if is_plain(conv1d, nn.Conv1d):
        return ops.causal_conv1d(x, conv1d.weight[:, 0], conv1d.bias, "silu", initial_state=initial_state,
                                 return_final_state=return_final_state, cu_seqlens=cu_seqlens)
    if cu_seqlens is None:
        y, final = _conv_by_call(conv1d, x, d_conv, initial_state)
    else:  # each packed sequence from its own state
        bounds = cu_seqlens.tolist()
        parts = [_conv_by_call(conv1d, x[:, :, a:b], d_conv, None if initial_state is None else initial_state[s:s + 1])
                 for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        y, final = torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=0)
    return (y, final) if return_final_state else y


def _conv_by_call(conv1d: nn.Module, x: torch.Tensor, d_conv: int, initial_state: torch.Tensor | None):
    """x (B, D, L) after the K-1 state steps (zeros without one), through the module -> SiLU(y)
    (B, D, L) and the last K-1 inputs (B, D, K-1). With padding K-1 on both sides, output t of
    the K-1 + L inputs sees the inputs t-K+1..t, so x's outputs are K-1..K-2+L."""
    width = d_conv - 1
    state = x.new_zeros(x.shape[0], x.shape[1], width) if initial_state is None else initial_state.to(x.dtype)
    seq = torch.cat([state, x], dim=-1)  # (B, D, K-1 + L)
    y = conv1d(seq)[..., width:width + x.shape[-1]]  # (B, D, L)
    return F.silu(y), seq[..., seq.shape[-1] - width:]


def causal_conv_step(conv1d: nn.Module, x: torch.Tensor, conv_state: torch.Tensor, d_conv: int) -> torch.Tensor:
    """One decoding step of `causal_conv`: x (B, D) -> SiLU(conv) (B, D), conv_state (B, D, K-1)
    shifted in place: the unchecked fused update on a plain nn.Conv1d's weight, else a call."""
    if is_plain(conv1d, nn.Conv1d):
        return ops.causal_conv1d_update_(x, conv_state, conv1d.weight[:, 0], conv1d.bias, "silu")
    y, final = _conv_by_call(conv1d, x[:, :, None], d_conv, conv_state)  # (B, D, 1), (B, D, K-1)
    conv_state.copy_(final)
    return y[:, :, 0]
