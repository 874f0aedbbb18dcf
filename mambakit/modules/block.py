"""The residual block: residual <- residual + hidden; hidden <- mixer(norm(residual)).

The residual stream is carried beside the hidden states (the official "prenorm" layout),
in fp32 when residual_in_fp32."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .norm import RMSNorm
from .state import MambaState, is_plain


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, residual_in_fp32: bool = True):
        super().__init__()
        self.mixer = mixer
        self.norm = norm
        self.residual_in_fp32 = residual_in_fp32

    def _pre(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        residual = hidden if residual is None else residual + hidden
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32 and residual.dtype != torch.float64:  # fp64 models stay exact
            residual = residual.float()
        return hidden, residual

    def _pre_inference(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        """`_pre`, as one fused kernel on CUDA when nothing is recorded for a backward (RMSNorm,
        Triton): the residual add and the norm in one pass over the (..., dim) rows, the normed
        output written in autocast's dtype when autocast is on (the rounding that its first GEMM
        would apply), with exactly _pre's roundings otherwise."""
        if (hidden.is_cuda and hidden.dtype != torch.float64 and is_plain(self.norm, RMSNorm)
                and ops.triton_available() and ops.no_autograd(hidden, residual, self.norm.weight)):
            out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
            return self._pre_fused(hidden, residual, out_dtype)
        return self._pre(hidden, residual)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None,
                cache: MambaState | None = None, cu_seqlens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: (B, L, dim). Returns the new (hidden, residual)."""
        hidden, residual = self._pre(hidden, residual)
        if cu_seqlens is None:  # mixers without packed-sequence support keep working
            return self.mixer(hidden, cache=cache), residual
        return self.mixer(hidden, cache=cache, cu_seqlens=cu_seqlens), residual

    def forward_with_states(self, hidden: torch.Tensor, residual: torch.Tensor | None, state: MambaState | None):
        """Like forward, returning the mixer's final state instead of writing a cache."""
        hidden, residual = self._pre(hidden, residual)
        out, final = self.mixer.forward_with_states(hidden, state)
        return out, residual, final

    def step(self, hidden: torch.Tensor, residual: torch.Tensor | None, cache: MambaState):
        """hidden, residual: (B, dim); one token. On CUDA the residual add and RMSNorm run as one
        fused kernel (`ops.add_rms_norm`), with exactly _pre's roundings. The fused kernel reads
        the norm's weight, so it runs only for a plain RMSNorm (`is_plain`); a wrapped one is called."""
        if hidden.is_cuda and is_plain(self.norm, RMSNorm) and ops.triton_available():
            hidden, residual = self._pre_fused(hidden, residual)
        else:
            hidden, residual = self._pre(hidden, residual)
        return self.mixer.step(hidden, cache), residual

    def _pre_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None, out_dtype=None):
        r_dtype = hidden.dtype if residual is None else torch.promote_types(residual.dtype, hidden.dtype)
        if self.residual_in_fp32 and r_dtype != torch.float64:
            r_dtype = torch.float32
        return ops.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, r_dtype, out_dtype)
