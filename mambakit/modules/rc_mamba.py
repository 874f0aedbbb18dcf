"""Reverse-complement equivariance for DNA (Caduceus, Schiff et al. 2024: RC parameter sharing).

A DNA sequence and its reverse complement (the other strand, read the other way) carry the same
information. A layer is RC-equivariant when f(RC(x)) = RC(f(x)). On token ids RC reverses the
sequence and complements each base (A<->T, C<->G); on hidden states (B, L, 2d) it reverses the
sequence and the channels (`rc_hidden`). Channel c and channel 2d-1-c are thus one feature seen
from the two strands: the first d channels describe the forward strand, the last d, in reversed
order, the reverse strand.

`RCPS(mixer)` makes any (B, L, d) -> (B, L, d) layer equivariant by running it, with the same
parameters, on each strand's half:

    out = concat(mixer(x[..., :d]),  RC(mixer(RC(x[..., d:]))))

Swapping the strands (RC of the input) swaps the two calls, so RC(out) is the output of RC(x).
`RCBiMamba` is that around the bidirectional `BiMamba` (Vim's layer: one in_proj and out_proj
shared by a forward and a backward scan, as Caduceus's weight-tied BiMamba), so that one layer
is bidirectional and equivariant. `RCRMSNorm` normalises each strand's half with one shared
weight, so that the residual blocks around the mixer stay equivariant too. The two strands run
as one batch of 2B sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bimamba import BiMamba


def rc_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """The reverse complement of hidden states (..., L, C): the sequence and the channels reversed."""
    return hidden.flip(-2, -1)


def _check_even(name: str, d_model: int) -> None:
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 2 or d_model % 2:
        raise ValueError(f"{name}: d_model must be an even int >= 2 (half a strand each), got {d_model!r}")


class RCPS(nn.Module):
    """An RC-equivariant layer (B, L, 2d) -> (B, L, 2d) from a layer (B, L, d) -> (B, L, d),
    its parameters shared by the two strands."""

    def __init__(self, mixer: nn.Module, d_model: int):
        super().__init__()
        _check_even("RCPS", d_model)
        self.mixer = mixer
        self.d_model = d_model

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """hidden (B, L, d_model) -> (B, L, d_model). `cache` must be None (no recurrent state)."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"RCPS expects hidden states of shape (B, L, {self.d_model}), got {tuple(hidden.shape)}")
        if cache is not None:
            raise ValueError("an RC-equivariant layer sees both strands, so it has no recurrent state (cache=None)")
        batch, half = hidden.shape[0], self.d_model // 2
        forward_strand = hidden[..., :half]  # (B, L, d)
        reverse_strand = rc_hidden(hidden[..., half:])  # (B, L, d), read in its own direction
        out = self.mixer(torch.cat([forward_strand, reverse_strand]))  # (2B, L, d)
        return torch.cat([out[:batch], rc_hidden(out[batch:])], dim=-1)  # (B, L, 2d)


class RCBiMamba(RCPS):
    """The bidirectional Mamba layer with RC parameter sharing: one BiMamba of width d_model / 2
    applied to both strands. d_model counts both halves."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 layer_idx: int | None = None, device=None, dtype=None, **bimamba_kwargs):
        _check_even("RCBiMamba", d_model)
        super().__init__(BiMamba(d_model // 2, d_state=d_state, d_conv=d_conv, expand=expand, layer_idx=layer_idx,
                                 device=device, dtype=dtype, **bimamba_kwargs), d_model)


class RCRMSNorm(nn.Module):
    """RMSNorm over each strand's half (B, L, 2d) with one weight of d channels: the forward
    half's channel c and the reverse half's channel 2d-1-c share weight[c]."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        _check_even("RCRMSNorm", d_model)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model // 2, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., 2d)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = self.weight.to(cdt)
        half = w.shape[0]
        xs = x.to(cdt)
        forward_half = F.rms_norm(xs[..., :half], (half,), w, self.eps)
        reverse_half = F.rms_norm(xs[..., half:], (half,), w.flip(0), self.eps)
        return torch.cat([forward_half, reverse_half], dim=-1).to(x.dtype)


__all__ = ["RCBiMamba", "RCPS", "RCRMSNorm", "rc_hidden"]
