"""The residual block: residual <- residual + hidden; hidden <- mixer(norm(residual)); and, in a
hybrid with an MLP (the official Block's `mlp`), residual <- residual + hidden; hidden <-
mlp(norm2(residual)).

The residual stream is carried beside the hidden states (the official "prenorm" layout),
in fp32 when residual_in_fp32. The mixer is any of the mixers (Mamba, Mamba2, S4D, Attention);
its cache is the mixer's state (a MambaState, or an AttentionState for attention)."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .attention import Attention
from .norm import RMSNorm
from .state import MambaState, is_plain


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, residual_in_fp32: bool = True,
                 mlp: nn.Module | None = None, norm2: nn.Module | None = None):
        super().__init__()
        self.mixer = mixer
        self.norm = norm
        self.residual_in_fp32 = residual_in_fp32
        if (mlp is None) != (norm2 is None):
            raise ValueError("a block's mlp comes with its norm2 (both or neither)")
        if mlp is not None:
            self.norm2 = norm2
            self.mlp = mlp
        else:
            self.mlp = None

    def _pre(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module | None = None):
        norm = self.norm if norm is None else norm
        residual = hidden if residual is None else residual + hidden
        hidden = norm(residual.to(norm.weight.dtype))
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
            hidden = self.mixer(hidden, cache=cache)
        else:
            hidden = self.mixer(hidden, cache=cache, cu_seqlens=cu_seqlens)
        return self._mlp(hidden, residual)

    def _mlp(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP half of a hybrid block (nothing without an MLP): (hidden, residual) after it."""
        if self.mlp is None:
            return hidden, residual
        hidden, residual = self._pre(hidden, residual, self.norm2)
        return self.mlp(hidden), residual

    def forward_with_states(self, hidden: torch.Tensor, residual: torch.Tensor | None, state, offset: int = 0):
        """Like forward, returning the mixer's final state instead of writing a cache (for an
        attention mixer, the keys and values the next chunk attends to; `offset` is the
        position of the chunk's first token)."""
        hidden, residual = self._pre(hidden, residual)
        if isinstance(self.mixer, Attention):
            out, final = self.mixer.forward_with_states(hidden, state, offset)
        else:
            out, final = self.mixer.forward_with_states(hidden, state)
        out, residual = self._mlp(out, residual)
        return out, residual, final

    def step(self, hidden: torch.Tensor, residual: torch.Tensor | None, cache):
        """hidden, residual: (B, dim); one token. On CUDA the residual add and RMSNorm run as one
        fused kernel (`ops.add_rms_norm`), with exactly _pre's roundings. The fused kernel reads
        the norm's weight, so it runs only for a plain RMSNorm (`is_plain`); a wrapped one is called."""
        hidden, residual = self._pre_step(hidden, residual, self.norm)
        hidden = self.mixer.step(hidden, cache)
        if self.mlp is None:
            return hidden, residual
        hidden, residual = self._pre_step(hidden, residual, self.norm2)
        return self.mlp(hidden), residual

    def _pre_step(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        if hidden.is_cuda and is_plain(norm, RMSNorm) and ops.triton_available():
            return self._pre_fused(hidden, residual, norm=norm)
        return self._pre(hidden, residual, norm)

    def _pre_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None, out_dtype=None,
                   norm: nn.Module | None = None):
        norm = self.norm if norm is None else norm
        r_dtype = hidden.dtype if residual is None else torch.promote_types(residual.dtype, hidden.dtype)
        if self.residual_in_fp32 and r_dtype != torch.float64:
            r_dtype = torch.float32
        return ops.add_rms_norm(hidden, residual, norm.weight, norm.eps, r_dtype, out_dtype)
