"""Mamba-2's fused decoding step, in place on the (batch, H, P, N) state (CUDA-graph friendly):
dt = limit(softplus(dt + bias)), h <- exp(dt A) h + dt x ⊗ B, y = h C + D x, gated by SiLU(z),
in one pass over the state, with y computed from the fp32 state before it is rounded to the
state's dtype. The readable reference is `ops.reference.ssd_state_update_ref`."""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .helpers import softplus


@triton.jit
def _ssd_step_kernel(STATE, X, DT, A, B, C, D, Z, BIAS, Y, H, G, P, N, lo, hi,
                     s_sb, s_sh, s_sp, s_xb, s_xh, s_dtb, s_bb, s_bg, s_cb, s_cg, s_zb, s_zh, s_yb, s_yh,
                     HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (batch, H, cdiv(P, BLOCK_P))
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = h // (H // G)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    ok_p, ok_n = offs_p < P, offs_n < N
    dt = tl.load(DT + b * s_dtb + h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(BIAS + h).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt, False)
    if LIMIT:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    decay = tl.exp(dt * tl.load(A + h).to(tl.float32))
    x = tl.load(X + b * s_xb + h * s_xh + offs_p, mask=ok_p, other=0.0).to(tl.float32)  # (BLOCK_P,)
    b_vec = tl.load(B + b * s_bb + g * s_bg + offs_n, mask=ok_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
    c_vec = tl.load(C + b * s_cb + g * s_cg + offs_n, mask=ok_n, other=0.0).to(tl.float32)
    slot = STATE + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :]
    ok = ok_p[:, None] & ok_n[None, :]
    state = tl.load(slot, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N)
    state = state * decay + (dt * x)[:, None] * b_vec[None, :]
    y = tl.sum(state * c_vec[None, :], axis=1)  # (BLOCK_P,), from the fp32 state
    tl.store(slot, state.to(STATE.dtype.element_ty), mask=ok)
    if HAS_D:
        if D_PER_CHANNEL:
            y += tl.load(D + h * P + offs_p, mask=ok_p, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D + h).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(Z + b * s_zb + h * s_zh + offs_p, mask=ok_p, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(Y + b * s_yb + h * s_yh + offs_p, y.to(Y.dtype.element_ty), mask=ok_p)


def ssd_state_update_triton_(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                             dt_limit=(0.0, math.inf)):
    """As ops.ssd_state_update_ (arguments checked there): state (batch, H, P, N) updated in place;
    returns y (batch, H, P) in x's dtype."""
    batch, heads, headdim, d_state = state.shape
    groups = B.shape[1]
    if state.stride(-1) != 1:
        raise ValueError("ssd_state_update_: the Triton step needs the state's last dim (N) contiguous")
    x, dt, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C))
    z = z if z is None or z.stride(-1) == 1 else z.contiguous()
    D = D.contiguous() if D is not None else None  # read as dense (H,) or (H, P): an expanded D is copied
    y = x.new_empty((batch, heads, headdim))
    block_n = max(16, triton.next_power_of_2(d_state))
    block_p = max(1, min(triton.next_power_of_2(headdim), 4096 // block_n))  # at most 4096 state elements a program
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    _ssd_step_kernel[(batch, heads, triton.cdiv(headdim, block_p))](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else A, y, heads, groups, headdim, d_state, lo, min(hi, 3.0e38),
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        (z if z is not None else x).stride(0), (z if z is not None else x).stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.ndim == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), LIMIT=(lo, hi) != (0.0, math.inf),
        BLOCK_P=block_p, BLOCK_N=block_n)
    return y
