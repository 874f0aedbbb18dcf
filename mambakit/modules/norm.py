"""RMSNorm, LayerNorm and Mamba-2's gated RMSNorm, computed in fp32 for fp32 / fp16 / bf16 inputs, in fp64
for fp64 ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        cdt = _compute_dtype(x)
        return F.rms_norm(x.to(cdt), self.weight.shape, self.weight.to(cdt), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(x)
        return F.layer_norm(x.to(cdt), self.normalized_shape, self.weight.to(cdt),
                            None if self.bias is None else self.bias.to(cdt), self.eps).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def make_norm(dim: int, rms_norm: bool, eps: float, device=None, dtype=None) -> nn.Module:
    return RMSNorm(dim, eps, device=device, dtype=dtype) if rms_norm else LayerNorm(dim, eps=eps, device=device,
                                                                                    dtype=dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated, grouped RMSNorm: x (..., dim) and the gate z (..., dim) ->
    rmsnorm(x · SiLU(z)) · weight (the default), or rmsnorm(x) · weight · SiLU(z) with
    norm_before_gate; each group of `group_size` channels is normalised on its own. fp32
    inside (fp64 for fp64 inputs), as RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group_size = dim if group_size is None else group_size
        if self.group_size < 1 or dim % self.group_size:
            raise ValueError(f"group_size {group_size} must divide dim {dim}")
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
