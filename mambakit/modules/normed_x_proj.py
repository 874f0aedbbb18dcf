"""Jamba's x_proj: the Mamba-1 mixer's x_proj followed by an RMSNorm on each of its outputs,
the low-rank dt, B and C (transformers' JambaMambaMixer's dt_layernorm, b_layernorm,
c_layernorm). It is an nn.Linear subclass, so its weight keeps x_proj's name and shape, and
`is_plain` is false for it: the mixer calls it instead of reading its weight, on every path
(the chunked scan, the Triton kernels, the decoding step), and these norms run there."""

from __future__ import annotations

import torch
from torch import nn

from .norm import RMSNorm


class NormedXProj(nn.Linear):
    def __init__(self, d_inner: int, dt_rank: int, d_state: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(d_inner, dt_rank + 2 * d_state, bias=False, device=device, dtype=dtype)
        self.dt_rank, self.d_state = dt_rank, d_state
        self.dt_norm = RMSNorm(dt_rank, eps, device=device, dtype=dtype)
        self.b_norm = RMSNorm(d_state, eps, device=device, dtype=dtype)
        self.c_norm = RMSNorm(d_state, eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_inner) -> (..., dt_rank + 2 · d_state): dt, B, C, each normalised."""
        dt, B, C = super().forward(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return torch.cat([self.dt_norm(dt), self.b_norm(B), self.c_norm(C)], dim=-1)
