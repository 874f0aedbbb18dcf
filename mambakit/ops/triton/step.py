"""Fused single-token decoding kernels, in place on the recurrent state (so that a CUDA graph can
replay them with the state in fixed buffers):

- `conv_update_`: shift the conv state by the new input, the depthwise conv, its bias and SiLU.
- `state_update_`: softplus(Δ + bias), exp(ΔA), h <- exp(ΔA) h + Δ B x, y = <h, C> + D x,
  gated by SiLU(z), in one pass over the (B, D, N) state.

The projections between them (x_proj, dt_proj) stay in cuBLAS. The readable references are
`ops.reference.selective_state_update_ref` and `causal_conv1d_update_ref`."""

from __future__ import annotations

import triton
import triton.language as tl

from .host import cdiv, next_power_of_2

from .helpers import softplus


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, dim, s_xb, s_sb, s_sd, s_yb,
                        WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    k = tl.arange(0, BLOCK_K)  # taps 0 .. WIDTH-1; the state holds taps 0 .. WIDTH-2
    md = d < dim
    x = tl.load(x_ptr + b * s_xb + d, mask=md, other=0.0).to(tl.float32)
    m_state = md[:, None] & (k[None, :] < WIDTH - 1)
    state = tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + k[None, :], mask=m_state, other=0.0)
    window = tl.where(k[None, :] == WIDTH - 1, x[:, None], state.to(tl.float32))  # (BLOCK_D, BLOCK_K)
    w = tl.load(w_ptr + d[:, None] * WIDTH + k[None, :], mask=md[:, None] & (k[None, :] < WIDTH), other=0.0)
    y = tl.sum(window * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * s_yb + d, y.to(y_ptr.dtype.element_ty), mask=md)
    # shift: the new state is taps 1 .. WIDTH-1 of the window
    shifted = tl.load(state_ptr + b * s_sb + d[:, None] * s_sd + k[None, :] + 1,
                      mask=md[:, None] & (k[None, :] < WIDTH - 2), other=0.0).to(tl.float32)
    shifted = tl.where(k[None, :] == WIDTH - 2, x[:, None], shifted)
    tl.debug_barrier()  # every read of the old state is done before it is overwritten
    tl.store(state_ptr + b * s_sb + d[:, None] * s_sd + k[None, :], shifted.to(state_ptr.dtype.element_ty),
             mask=m_state)


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, w_dt_ptr,
                         dim, d_state, channels_per_group, dt_rank, s_hb, s_xb, s_dtb, s_bb, s_bg, s_zb, s_yb,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, DT_PROJ: tl.constexpr, A_IS_LOG: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md, mn = d < dim, n < d_state
    m_dn = md[:, None] & mn[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group  # BLOCK_D divides channels_per_group
    x = tl.load(x_ptr + b * s_xb + d, mask=md, other=0.0).to(tl.float32)
    if DT_PROJ:  # dt_ptr holds the low-rank input (B, R): Δ = W_dt dt_r, fused (dt_proj of the mixer)
        r = tl.arange(0, BLOCK_R)
        mr = r < dt_rank
        dt_r = tl.load(dt_ptr + b * s_dtb + r, mask=mr, other=0.0).to(tl.float32)
        w = tl.load(w_dt_ptr + d[:, None] * dt_rank + r[None, :], mask=md[:, None] & mr[None, :], other=0.0)
        dt = tl.sum(w.to(tl.float32) * dt_r[None, :], axis=1)
    else:
        dt = tl.load(dt_ptr + b * s_dtb + d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt, False)
    A = tl.load(A_ptr + d[:, None] * d_state + n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    if A_IS_LOG:  # A_ptr holds the mixer's A_log: A = -exp(A_log), formed here rather than by a launch per step
        A = -tl.exp(A)
    Bv = tl.load(B_ptr + b * s_bb + group * s_bg + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_bb + group * s_bg + n, mask=mn, other=0.0).to(tl.float32)
    offs = b * s_hb + d[:, None] * d_state + n[None, :]
    h = tl.load(state_ptr + offs, mask=m_dn, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + offs, h.to(state_ptr.dtype.element_ty), mask=m_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + d, mask=md, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(y_ptr + b * s_yb + d, y.to(y_ptr.dtype.element_ty), mask=md)


def conv_update_(x, conv_state, weight, bias=None, activation=None):
    """x: (B, D); conv_state: (B, D, K-1), contiguous in its last axis, shifted in place;
    weight: (D, K). Returns y (B, D) in x's dtype."""
    import torch
    batch, dim = x.shape
    width = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    y = torch.empty_like(x)
    block_d = min(128, next_power_of_2(dim))
    _conv_update_kernel[(batch, cdiv(dim, block_d))](
        x, conv_state, weight, bias if bias is not None else weight, y, dim, x.stride(0), conv_state.stride(0),
        conv_state.stride(1), y.stride(0), WIDTH=width, HAS_BIAS=bias is not None, SILU=activation is not None,
        BLOCK_D=block_d, BLOCK_K=max(2, next_power_of_2(width)))
    return y


def state_update_(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_weight=None,
                  a_is_log=False):
    """state: (B, D, N) contiguous, updated in place; x, dt, z: (B, D); A: (D, N); B, C: (B, N) or
    (B, G, N). Returns y (B, D) in x's dtype. With dt_weight (D, R), dt is the low-rank (B, R)
    input of the mixer's dt_proj and Δ = dt @ dt_weight.T is computed in the kernel. With
    a_is_log, A is the mixer's A_log and A = -exp(A_log) is computed in the kernel."""
    import torch
    batch, dim, d_state = state.shape
    groups = B.shape[1] if B.ndim == 3 else 1
    cpg = dim // groups
    Bv = B if B.ndim == 3 else B[:, None]  # (B, G, N); x_proj's output slices need no copy
    Cv = C if C.ndim == 3 else C[:, None]
    if Bv.stride(-1) != 1 or Cv.stride() != Bv.stride():
        Bv, Cv = Bv.contiguous(), Cv.contiguous()
    x, dt = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt))
    z = None if z is None else (z if z.stride(-1) == 1 else z.contiguous())
    y = torch.empty_like(x)
    block_n = max(2, next_power_of_2(d_state))
    block_d = 1
    while block_d * 2 <= max(1, 2048 // block_n) and block_d * 2 <= 64 and cpg % (block_d * 2) == 0:
        block_d *= 2
    dummy = state
    dt_rank = dt_weight.shape[1] if dt_weight is not None else 1
    _state_update_kernel[(batch, cdiv(dim, block_d))](
        state, x, dt, A.contiguous(), Bv, Cv, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y, dt_weight.contiguous() if dt_weight is not None else dummy,
        dim, d_state, cpg, dt_rank, state.stride(0), x.stride(0),
        dt.stride(0), Bv.stride(0), Bv.stride(1), z.stride(0) if z is not None else 0, y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        DT_PROJ=dt_weight is not None, A_IS_LOG=bool(a_is_log), BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_R=max(2, next_power_of_2(dt_rank)))
    return y
