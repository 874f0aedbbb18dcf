"""Single-token decoding updates in torch, in place on the state (mamba_ssm's convention).

They are the fast path of `selective_state_update_ref` / `causal_conv1d_update_ref`, which
return new states instead: a few fused in-place ops per layer, because at one token per
step the time goes to per-op overhead, not arithmetic."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # .to() costs a few µs even when it does nothing


def selective_state_update_(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """state: (B, D, N) fp32, updated in place; x, dt, z: (B, D); A: (D, N); B, C: (B, N) or
    (B, G, N). Returns y (B, D) in x's dtype. Arguments are not checked: see ops.selective_state_update."""
    batch, dim, d_state = state.shape
    cdt = state.dtype
    dt = _as(dt, cdt)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if B.ndim == 3:  # (B, G, N): channel d reads group d // (D // G)
        groups = B.shape[1]
        shape = (batch, groups, dim // groups, d_state)
        Bx, Cx = _as(B, cdt)[:, :, None], _as(C, cdt)[:, :, None]
    else:
        shape = (batch, 1, dim, d_state)
        Bx, Cx = _as(B, cdt)[:, None, None], _as(C, cdt)[:, None, None]
    xc = _as(x, cdt)
    state.mul_(torch.exp(dt[..., None] * A))  # Ā h
    state.view(shape).addcmul_((dt * xc).view(shape[:3] + (1,)), Bx)  # + Δ B x
    y = torch.matmul(state.view(shape), Cx.transpose(-1, -2)).view(batch, dim)  # <h, C>
    if D is not None:
        y = y.addcmul_(xc, D)
    if z is not None:
        y = y.mul_(F.silu(_as(z, cdt)))
    return _as(y, x.dtype)


def causal_conv1d_update_(x, conv_state, weight, bias=None, activation=None):
    """x: (B, D); conv_state: (B, D, K-1), shifted in place. Returns y (B, D)."""
    wdt = weight.dtype
    y = (_as(conv_state, wdt) * weight[:, :-1]).sum(-1).addcmul_(_as(x, wdt), weight[:, -1])
    if bias is not None:
        y = y.add_(bias)
    if conv_state.shape[-1]:
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], _as(x[..., None], conv_state.dtype)], dim=-1))
    return _as(F.silu(y) if activation is not None else y, x.dtype)


def ssd_state_update_(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                      dt_limit=(0.0, math.inf)):
    """Mamba-2's step, in place on state (B, H, P, N): x, z (B, H, P); dt (B, H); A (H,); B, C
    (B, G, N), head h reading group h // (H // G); D (H,) or (H, P). The arithmetic runs in fp32
    (fp64 for a fp64 state) and y comes from the new state before it is stored in the state's
    dtype. Returns y (B, H, P) in x's dtype. Arguments are not checked: see ops.ssd_state_update_.

    A contiguous fp32 (fp64) state is updated where it lies, one pass for the decay and one for
    the input: at decoding's one token per step the (H, P, N) state is the biggest thing it touches."""
    batch, heads, headdim, d_state = state.shape
    groups = B.shape[1]
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32
    dt = _as(dt, cdt)
    if dt_bias is not None:
        dt = dt + _as(dt_bias, cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])  # (B, H)
    xc = _as(x, cdt)  # (B, H, P)
    decay = torch.exp(dt * _as(A, cdt))[..., None, None]  # (B, H, 1, 1)
    in_place = state.dtype == cdt and state.is_contiguous()
    h = state.mul_(decay) if in_place else (_as(state, cdt) * decay).contiguous()  # (B, H, P, N)
    per_group = (batch, groups, heads // groups * headdim, d_state)  # heads of a group side by side
    dtx = (dt[..., None] * xc).view(per_group[:3] + (1,))  # (B, G, hg·P, 1)
    h.view(per_group).addcmul_(dtx, _as(B, cdt)[:, :, None, :])  # + Δ x Bᵀ
    y = torch.matmul(h.view(per_group), _as(C, cdt)[:, :, :, None]).view(batch, heads, headdim)  # h C
    if not in_place:
        state.copy_(h)
    if D is not None:
        y = y.addcmul_(xc, (D[:, None] if D.ndim == 1 else D).to(cdt))
    if z is not None:
        y = y.mul_(F.silu(_as(z, cdt)))
    return _as(y, x.dtype)
