"""What the mixers share: the recurrent state of one layer (`MambaState`), its checks, and the
input handling of a one-token decoding step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class MambaState:
    """The recurrent state of one mixer: what a Transformer's KV cache is, at a fixed size."""
    conv: torch.Tensor  # (B, D_inner, K-1): the last K-1 conv inputs
    ssm: torch.Tensor  # (B, D_inner, N), fp32


class _MixerShape(Protocol):
    d_inner: int
    d_conv: int
    d_state: int


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
