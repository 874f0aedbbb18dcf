"""The depthwise causal conv1d in torch: the fast path on any device.

It works time-major, as K shifted multiply-adds over a (B, K-1+L, D) buffer, so that an input
coming from in_proj (a (B, L, D) tensor seen as (B, D, L)) is read without a transpose and the
output is time-major too, which is the layout the chunked scan reads fastest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_conv_args
from .recording import no_autograd
from .varlen import split_varlen_conv


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                        initial_state: Tensor | None = None, return_final_state: bool = False,
                        cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Same signature and results as `causal_conv1d_ref`. x: (B, D, L); weight: (D, K).
    Returns y (B, D, L) [, final_state (B, D, K-1)] in x's dtype; y is time-major in memory."""
    width = check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return split_varlen_conv(causal_conv1d_torch, x, weight, bias, activation, initial_state,
                                 return_final_state, cu_seqlens)
    batch, dim, length = x.shape
    past = (x.new_zeros(batch, width - 1, dim) if initial_state is None
            else initial_state.to(x.dtype).transpose(1, 2))  # (B, K-1, D)
    xx = torch.cat([past, x.transpose(1, 2)], dim=1)  # (B, K-1+L, D)
    w = weight.to(x.dtype)
    y = xx[:, width - 1:] * w[:, width - 1]  # (B, L, D), a fresh tensor: the rest updates it in place
    for k in range(width - 1):
        y.addcmul_(xx[:, k:k + length], w[:, k])
    if bias is not None:
        y.add_(bias.to(x.dtype))
    if activation is not None:
        y = F.silu(y, inplace=no_autograd(x, weight, bias, initial_state))  # the backward reads SiLU's input
    y = y.transpose(1, 2)  # (B, D, L)
    if not return_final_state:
        return y
    return y, xx[:, xx.shape[1] - (width - 1):].transpose(1, 2).contiguous()  # (B, D, K-1)
