"""The specification: slow, sequential, obviously correct.

Every fast path in mambakit (the chunked torch scan, the Triton kernels) is tested against
these functions. They compute in fp32, or in fp64 when an input is fp64.

    Δ   = softplus(delta + delta_bias)          (if delta_softplus)
    Ā_t = exp(Δ_t · A)                          (zero-order hold)
    h_t = Ā_t ⊙ h_{t-1} + Δ_t · B_t · u_t
    y_t = ⟨h_t, C_t⟩ + D · u_t
    out = y · SiLU(z)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import (check_conv_args, check_conv_update_args, check_scan_args, check_state_update_args,
                     compute_dtype)
from .ssd_checks import check_ssd_args
from .varlen import split_varlen, split_varlen_conv, split_varlen_ssd


def _expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, N, L) or (B, G, N, L) -> (B, D, N, L): channel d reads group d // (D // G)."""
    if BC.ndim == 3:
        return BC.unsqueeze(1).expand(-1, dim, -1, -1)
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       initial_state: Tensor | None = None, return_final_state: bool = False,
                       cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L) or (B, G, N, L); D, delta_bias: (D,);
    initial_state: (B, D, N), or (S, D, N) with cu_seqlens. Returns y (B, D, L) in u's dtype
    [, final_state (B or S, D, N) in the compute dtype]."""
    shape = check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return split_varlen(selective_scan_ref, u, delta, B, C, z, initial_state, cu_seqlens,
                            return_final_state, A=A, D=D, delta_bias=delta_bias,
                            delta_softplus=delta_softplus)
    cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, length, d_state = shape.batch, shape.dim, shape.length, shape.d_state

    dt = delta.to(cdt)  # (B, D, L)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A = A.to(cdt)  # (D, N)
    Bx = _expand_groups(B.to(cdt), dim)  # (B, D, N, L)
    Cx = _expand_groups(C.to(cdt), dim)  # (B, D, N, L)
    uc = u.to(cdt)  # (B, D, L)

    h = (torch.zeros(batch, dim, d_state, dtype=cdt, device=u.device) if initial_state is None
         else initial_state.to(cdt))  # (B, D, N)
    ys = []
    for t in range(length):
        dt_t = dt[:, :, t, None]  # (B, D, 1)
        h = torch.exp(dt_t * A) * h + dt_t * Bx[..., t] * uc[:, :, t, None]  # (B, D, N)
        ys.append((h * Cx[..., t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                      initial_state: Tensor | None = None, return_final_state: bool = False,
                      cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv: y[:, d, t] = bias[d] + sum_k weight[d, k] * x[:, d, t - (K-1) + k],
    with x at negative times taken from initial_state (B, D, K-1) or zero. With cu_seqlens (batch 1)
    each packed sequence starts afresh, from its own row of initial_state (S, D, K-1).
    x: (B, D, L); weight: (D, K). Returns y (B, D, L) [, final_state (B or S, D, K-1)], in x's dtype."""
    width = check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return split_varlen_conv(causal_conv1d_ref, x, weight, bias, activation, initial_state,
                                 return_final_state, cu_seqlens)
    cdt = compute_dtype(x, weight, bias, initial_state)
    batch, dim, length = x.shape
    past = (torch.zeros(batch, dim, width - 1, dtype=cdt, device=x.device) if initial_state is None
            else initial_state.to(cdt))
    xx = torch.cat([past, x.to(cdt)], dim=-1)  # (B, D, K-1+L)
    w = weight.to(cdt)
    y = torch.zeros(batch, dim, length, dtype=cdt, device=x.device)
    for k in range(width):
        y = y + w[:, k, None] * xx[:, :, k:k + length]
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    if activation is not None:
        y = F.silu(y)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final = xx[:, :, xx.shape[-1] - (width - 1):].to(x.dtype)  # (B, D, K-1)
    return y, final


def selective_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                               dt_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """One decoding step of the scan. state: (B, D, N); x, dt, z: (B, D); B, C: (B, N) or
    (B, G, N). Returns (y (B, D) in x's dtype, new_state (B, D, N) in state's dtype)."""
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    cdt = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dim = x.shape[1]
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if B.ndim == 3:  # (B, G, N) -> (B, D, N)
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    else:
        B, C = B[:, None], C[:, None]
    xc = x.to(cdt)
    h = torch.exp(dt[..., None] * A.to(cdt)) * state.to(cdt) + dt[..., None] * B.to(cdt) * xc[..., None]
    y = (h * C.to(cdt)).sum(-1)  # (B, D)
    if D is not None:
        y = y + D.to(cdt) * xc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), h.to(state.dtype)


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                             activation: str | None = None) -> tuple[Tensor, Tensor]:
    """One decoding step of the conv. x: (B, D); conv_state: (B, D, K-1) holds the last K-1
    inputs. Returns (y (B, D), new_conv_state (B, D, K-1)), in x's and conv_state's dtypes."""
    check_conv_update_args(x, conv_state, weight, bias, activation)
    cdt = compute_dtype(x, conv_state, weight, bias)
    window = torch.cat([conv_state.to(cdt), x.to(cdt)[..., None]], dim=-1)  # (B, D, K)
    y = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation is not None:
        y = F.silu(y)
    return y.to(x.dtype), window[..., 1:].to(conv_state.dtype)


def batched_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (O, C) applied to channels-first x (B, C, L) -> (B, O, L), as one batched GEMM
    over a stride-0 expanded weight: no transposed copy of x, forward or backward (torch.matmul
    would fold the batch into rows and copy x^T). The weight is cast to x's dtype first, so
    that under autocast only the small weight is cast, not its expansion (the GEMM then runs in
    the autocast dtype, whatever x's). The mixers' projections, and Δ = dt_proj(dt) before its
    bias and softplus."""
    return torch.bmm(weight.to(x.dtype).expand(x.shape[0], -1, -1), x)


def add_rms_norm_ref(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     residual_dtype: torch.dtype, out_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's residual add and RMSNorm, with their roundings: r = residual + hidden (torch's
    promotion), kept in residual_dtype; x = r in the norm weight's dtype; y = x / sqrt(mean(x^2)
    + eps) * weight computed in fp32 (fp64 for fp64), rounded to the weight's dtype, then to
    out_dtype when given. hidden, residual: (..., dim). Returns (y, r)."""
    r = (hidden if residual is None else residual + hidden).to(residual_dtype)
    x = r.to(weight.dtype)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.rms_norm(x.to(cdt), weight.shape, weight.to(cdt), eps).to(weight.dtype)
    return (y if out_dtype is None else y.to(out_dtype)), r


def patchify_ref(x: torch.Tensor, patch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images x (B, C, H, W) -> patch rows (B, (H/p)*(W/p), C*p*p), each patch flattened in
    (channel, y, x) order, as a Conv2d of kernel = stride = p flattens its weight: a permuted
    view copied (and cast to `dtype`) in one pass."""
    batch, chans, height, width = x.shape
    gh, gw = height // patch, width // patch
    out = x.new_empty(batch, gh * gw, chans * patch * patch, dtype=dtype or x.dtype)
    out.view(batch, gh, gw, chans, patch, patch).copy_(
        x.reshape(batch, chans, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5))  # (B, gh, gw, C, p, p)
    return out


def bimamba_inference_ref(hidden: torch.Tensor, weights, length: int) -> torch.Tensor:
    """Vision Mamba's bidirectional mixer on hidden (B, Lp, d_model), its first `length` steps
    real, from its weights (ops.vision.BiMambaWeights): x, z = in_proj(hidden); per direction a
    causal conv1d + SiLU, x_proj -> (dt, B, C), Δ = softplus(dt_proj(dt) + bias) and the scan,
    the backward direction on the time-flipped steps; out = out_proj(out_scale (y_f + y_b)
    SiLU(z)). Computed in fp32 (the sequential scan); returns (B, Lp, d_model) in the weights'
    dtype, with zeros at the padding steps."""
    batch, padded, _ = hidden.shape
    w = weights
    di, n = w.out.shape[1], w.A[0].shape[1]
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    xz = F.linear(hidden[:, :length].float(), f32(w.in_proj), f32(w.in_proj_bias))  # (B, L, 2 D_inner)
    x, z = xz[..., :di].transpose(1, 2), xz[..., di:].transpose(1, 2)  # (B, D_inner, L) each
    y = torch.zeros_like(x)
    for k, flip in ((0, False), (1, True)):
        xk = x.flip(-1) if flip else x
        bias = None if w.conv_bias is None else f32(w.conv_bias[k * di:(k + 1) * di])
        u = causal_conv1d_ref(xk, f32(w.conv[k * di:(k + 1) * di]), bias, "silu")  # (B, D_inner, L)
        x_dbl = torch.einsum("od,bdl->bol", f32(w.x_proj[k]), u)  # (B, R + 2N, L)
        dt, B, C = x_dbl.split([x_dbl.shape[1] - 2 * n, n, n], dim=1)
        delta = torch.einsum("dr,brl->bdl", f32(w.dt_proj[k]), dt)  # (B, D_inner, L)
        yk = selective_scan_ref(u, delta, f32(w.A[k]), B, C, D=f32(w.D[k]), delta_bias=f32(w.dt_bias[k]),
                                delta_softplus=True)
        y += yk.flip(-1) if flip else yk
    y = y * F.silu(z) * w.out_scale  # (B, D_inner, L)
    out = hidden.new_zeros(batch, padded, w.out.shape[0], dtype=torch.float32)
    out[:, :length] = F.linear(y.transpose(1, 2), f32(w.out), f32(w.out_bias))
    return out.to(w.in_proj.dtype)


# ---- Mamba-2: the state-space dual (SSD) scan ----------------------------------------------------
#
#   dt_t = softplus(dt_t + dt_bias)   (if dt_softplus), then clamped to dt_limit (unless (0, inf))
#   a_t  = exp(dt_t · A_h)            (one scalar decay per head)
#   h_t  = a_t · h_{t-1} + dt_t · x_t ⊗ B_t          (h: (P, N) per head)
#   y_t  = h_t C_t + D · x_t,  out = y · SiLU(z)
# Head h reads the B/C group h // (H // G).

def _ssd_step_sizes(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit, cdt) -> Tensor:
    """dt (batch, L, H) -> the step sizes the scan uses, in the compute dtype."""
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _ssd_skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D x, gated by SiLU(z). y, x, z: (batch, L, H, P) in the compute dtype; D (H,) or (H, P)."""
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D).to(y.dtype) * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def ssd_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
            z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
            dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: Tensor | None = None,
            return_final_state: bool = False, cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The Mamba-2 scan, one step at a time. x, z: (batch, L, H, P); dt: (batch, L, H); A, dt_bias:
    (H,); B, C: (batch, L, G, N); D: (H,) or (H, P); initial_state: (batch, H, P, N), or (S, H, P, N)
    with cu_seqlens (batch 1; the state restarts at each offset). Returns y (batch, L, H, P) in x's
    dtype [, final_state (batch or S, H, P, N) in the compute dtype]."""
    shape = check_ssd_args(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, cu_seqlens)
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    heads_per_group = shape.heads // shape.groups
    step = _ssd_step_sizes(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (batch, L, H)
    decay = torch.exp(step * A.to(cdt))  # (batch, L, H)
    Bh = B.to(cdt).repeat_interleave(heads_per_group, dim=2)  # (batch, L, H, N)
    Ch = C.to(cdt).repeat_interleave(heads_per_group, dim=2)  # (batch, L, H, N)
    xc = x.to(cdt)  # (batch, L, H, P)
    offsets = [0, shape.length] if cu_seqlens is None else cu_seqlens.tolist()
    starts = {start: s for s, start in enumerate(offsets[:-1])}
    zeros = torch.zeros(shape.batch, shape.heads, shape.headdim, shape.d_state, dtype=cdt, device=x.device)

    ys, finals = [], []
    for t in range(shape.length):
        if t in starts:  # a sequence begins: its own initial state, or zero
            s = starts[t]
            if initial_state is None:
                h = zeros
            else:
                h = initial_state.to(cdt) if cu_seqlens is None else initial_state[s:s + 1].to(cdt)
        inp = (step[:, t, :, None] * xc[:, t])[..., None] * Bh[:, t, :, None, :]  # (batch, H, P, N)
        h = decay[:, t, :, None, None] * h + inp  # (batch, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
        if t + 1 in offsets:
            finals.append(h)
    y = _ssd_skip_and_gate(torch.stack(ys, dim=1), xc, D, z).to(x.dtype)  # (batch, L, H, P)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y


def ssd_dual_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                 z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                 dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: Tensor | None = None,
                 return_final_state: bool = False, cu_seqlens: Tensor | None = None
                 ) -> Tensor | tuple[Tensor, Tensor]:
    """ssd_ref's result from the quadratic "dual" (attention-like) form, the SSD paper's:
    y = (M ∘ (C Bᵀ)) (dt·x) with M[t, s] = exp(sum_{s<k<=t} dt_k A) for s <= t, else 0, plus the
    initial state read through C_t and decayed by exp(sum_{k<=t} dt_k A). Same arguments and
    results as ssd_ref; O(L²) memory."""
    shape = check_ssd_args(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return split_varlen_ssd(ssd_dual_ref, x, dt, B, C, z, initial_state, cu_seqlens, return_final_state,
                                A=A, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    heads_per_group = shape.heads // shape.groups
    step = _ssd_step_sizes(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (batch, L, H)
    log_decay = torch.cumsum(step * A.to(cdt), dim=1).transpose(1, 2)  # (batch, H, L): sum_{k<=t} dt_k A
    diff = log_decay[..., :, None] - log_decay[..., None, :]  # (batch, H, t, s): sum_{s<k<=t} dt_k A
    causal = torch.ones(shape.length, shape.length, dtype=torch.bool, device=x.device).tril()
    M = torch.exp(diff.masked_fill(~causal, -math.inf))  # (batch, H, t, s)
    Bh = B.to(cdt).repeat_interleave(heads_per_group, dim=2)  # (batch, L, H, N)
    Ch = C.to(cdt).repeat_interleave(heads_per_group, dim=2)  # (batch, L, H, N)
    xc = x.to(cdt)
    dtx = step[..., None] * xc  # (batch, L, H, P)
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh) * M  # (batch, H, t, s)
    y = torch.einsum("bhts,bshp->bthp", scores, dtx)  # (batch, L, H, P)
    to_end = torch.exp(log_decay[..., -1:] - log_decay)  # (batch, H, L): decay from after s to the end
    final = torch.einsum("bhs,bshp,bshn->bhpn", to_end, dtx, Bh)  # (batch, H, P, N)
    if initial_state is not None:
        h0 = initial_state.to(cdt)  # (batch, H, P, N)
        y = y + torch.exp(log_decay).transpose(1, 2)[..., None] * torch.einsum("bhpn,bthn->bthp", h0, Ch)
        final = final + torch.exp(log_decay[..., -1])[..., None, None] * h0
    y = _ssd_skip_and_gate(y, xc, D, z).to(x.dtype)
    return (y, final) if return_final_state else y


def ssd_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                         dt_softplus: bool = False, dt_limit=(0.0, math.inf)) -> tuple[Tensor, Tensor]:
    """One decoding step of the SSD, defined as `ssd_ref` over a sequence of one token that starts
    from `state`: state (batch, H, P, N), x and z (batch, H, P), dt (batch, H), B/C (batch, G, N)
    -> (y (batch, H, P) in x's dtype, the new state in state's dtype). y is computed from the
    new state in fp32 (fp64) before that is rounded to the state's dtype."""
    y, final = ssd_ref(x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
                       z=None if z is None else z[:, None], dt_bias=dt_bias, dt_softplus=dt_softplus,
                       dt_limit=dt_limit, initial_state=state, return_final_state=True)
    return y[:, 0], final.to(state.dtype)


def gated_rms_norm_ref(x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int,
                       norm_before_gate: bool = False) -> Tensor:
    """Mamba-2's gated, grouped RMSNorm: x, z (..., dim), weight (dim,) -> rmsnorm(x · SiLU(z)) · weight
    (default) or rmsnorm(x) · weight · SiLU(z) (norm_before_gate), each group of group_size channels
    normalised on its own; fp32 inside (fp64 for fp64 x), y in x's dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdt)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(cdt))
    groups = h.unflatten(-1, (-1, group_size))  # (..., dim / group_size, group_size)
    h = F.rms_norm(groups, (group_size,), eps=eps).flatten(-2) * weight.to(cdt)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(cdt))
    return h.to(x.dtype)
