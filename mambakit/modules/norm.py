"""RMSNorm and LayerNorm computed in fp32 whatever the input dtype."""

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
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)


def make_norm(dim: int, rms_norm: bool, eps: float, device=None, dtype=None) -> nn.Module:
    return RMSNorm(dim, eps, device=device, dtype=dtype) if rms_norm else LayerNorm(dim, eps=eps, device=device,
                                                                                    dtype=dtype)
