"""Single-token decoding updates in torch, in place on the state (mamba_ssm's convention).

They are the fast path of `selective_state_update_ref` / `causal_conv1d_update_ref`, which
return new states instead: a few fused in-place ops per layer, because at one token per
step the time goes to per-op overhead, not arithmetic."""

from __future__ import annotations

import torch
import torch.nn.functional as F



def selective_state_update_(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """state: (B, D, N) fp32, updated in place; x, dt, z: (B, D); A: (D, N); B, C: (B, N) or
    (B, G, N). Returns y (B, D) in x's dtype. Arguments are not checked: see ops.selective_state_update."""
    batch, dim, d_state = state.shape
    cdt = state.dtype
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if B.ndim == 3:  # (B, G, N): channel d reads group d // (D // G)
        groups = B.shape[1]
        shape = (batch, groups, dim // groups, d_state)
        Bx, Cx = B.to(cdt)[:, :, None], C.to(cdt)[:, :, None]
    else:
        shape = (batch, 1, dim, d_state)
        Bx, Cx = B.to(cdt)[:, None, None], C.to(cdt)[:, None, None]
    xc = x.to(cdt)
    state.mul_(torch.exp(dt[..., None] * A))  # Ā h
    state.view(shape).addcmul_((dt * xc).view(shape[:3] + (1,)), Bx)  # + Δ B x
    y = torch.matmul(state.view(shape), Cx.transpose(-1, -2)).view(batch, dim)  # <h, C>
    if D is not None:
        y = y.addcmul_(xc, D)
    if z is not None:
        y = y.mul_(F.silu(z.to(cdt)))
    return y.to(x.dtype)


def causal_conv1d_update_(x, conv_state, weight, bias=None, activation=None):
    """x: (B, D); conv_state: (B, D, K-1), shifted in place. Returns y (B, D)."""
    y = (conv_state.to(weight.dtype) * weight[:, :-1]).sum(-1).addcmul_(x.to(weight.dtype), weight[:, -1])
    if bias is not None:
        y = y.add_(bias)
    if conv_state.shape[-1]:
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], x[..., None].to(conv_state.dtype)], dim=-1))
    return F.silu(y).to(x.dtype) if activation is not None else y.to(x.dtype)
