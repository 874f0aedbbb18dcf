"""RMSNorm and LayerNorm computed in fp32 for fp32 / fp16 / bf16 inputs, in fp64 for fp64 ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
