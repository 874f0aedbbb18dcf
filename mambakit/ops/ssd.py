"""The chunked Mamba-2 (SSD) scan in pure torch: runs on any device and is the CPU default.

L is cut into chunks of T steps (the last one padded with dt = 0, which neither decays nor
feeds the state). Per chunk, as batched matmuls:
  1. within the chunk, the quadratic dual form y = (M ∘ C Bᵀ)(dt·x), with the decay mask
     M[t, s] = exp(cs_t - cs_s) for s <= t from the chunk's cumulative sum cs of dt·A; the
     differences are masked to the lower triangle before exp, so exp never sees a positive number;
  2. each chunk's own contribution to the state at its end, sum_s exp(cs_end - cs_s) dt_s x_s ⊗ B_s.
Then a loop over chunks carries the state across chunk boundaries (h_c = exp(cs_end) h_{c-1}
+ the chunk's contribution), and each chunk reads the state it starts from through C,
decayed by exp(cs_t). Gradients come from autograd. Packed sequences (cu_seqlens) run one
sequence at a time (varlen.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import compute_dtype
from .ssd_checks import check_chunk_size, check_ssd_args
from .varlen import split_varlen_ssd

DEFAULT_CHUNK_SIZE = 256


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: Tensor | None = None,
                return_final_state: bool = False, cu_seqlens: Tensor | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor | tuple[Tensor, Tensor]:
    """As ssd_ref (reference.py), computed chunk by chunk. x, z: (batch, L, H, P); dt: (batch, L, H);
    A, dt_bias: (H,); B, C: (batch, L, G, N); D: (H,) or (H, P); initial_state (batch or S, H, P, N).
    Returns y (batch, L, H, P) in x's dtype [, final_state (batch or S, H, P, N), fp32 or fp64]."""
    shape = check_ssd_args(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, cu_seqlens)
    T = check_chunk_size(chunk_size)
    if cu_seqlens is not None:
        return split_varlen_ssd(ssd_chunked, x, dt, B, C, z, initial_state, cu_seqlens, return_final_state,
                                A=A, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                                chunk_size=T)
    cdt = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    batch, length, heads, headdim = x.shape
    groups, d_state = shape.groups, shape.d_state
    T = min(T, length)
    n_chunks = -(-length // T)
    pad = n_chunks * T - length

    xc = x.to(cdt)  # (batch, L, H, P)
    step = step_sizes(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (batch, L, H)
    dtx = step[..., None] * xc  # (batch, L, H, P)
    dA = step * A.to(cdt)  # (batch, L, H), <= 0 for A < 0

    def chunked(t: Tensor) -> Tensor:  # (batch, L, ...) -> (batch, c, T, ...), zero-padded
        t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
        return t.reshape(batch, n_chunks, T, *t.shape[2:])

    dtx_c = chunked(dtx)  # (batch, c, T, H, P)
    B_c = chunked(B.to(cdt))  # (batch, c, T, G, N)
    C_c = chunked(C.to(cdt))  # (batch, c, T, G, N)
    cs = torch.cumsum(chunked(dA), dim=2).permute(0, 3, 1, 2)  # (batch, H, c, T): sum of dt·A up to t
    per_group = heads // groups

    # 1. within each chunk: the dual form
    diff = cs[..., :, None] - cs[..., None, :]  # (batch, H, c, t, s)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    M = torch.exp(diff.masked_fill(~causal, -math.inf))  # (batch, H, c, t, s)
    CB = torch.einsum("bctgn,bcsgn->bgcts", C_c, B_c).repeat_interleave(per_group, dim=1)  # (batch, H, c, t, s)
    y = torch.einsum("bhcts,bcshp->bcthp", CB * M, dtx_c)  # (batch, c, T, H, P)

    # 2. each chunk's contribution to the state at its end
    B_h = B_c.repeat_interleave(per_group, dim=3)  # (batch, c, T, H, N)
    C_h = C_c.repeat_interleave(per_group, dim=3)  # (batch, c, T, H, N)
    to_end = torch.exp(cs[..., -1:] - cs)  # (batch, H, c, T)
    chunk_states = torch.einsum("bhcs,bcshp,bcshn->bchpn", to_end, dtx_c, B_h)  # (batch, c, H, P, N)

    # 3. the state across chunks: h_c = exp(cs_end) h_{c-1} + chunk_states[c]
    chunk_decay = torch.exp(cs[..., -1])  # (batch, H, c)
    h = (torch.zeros(batch, heads, headdim, d_state, dtype=cdt, device=x.device) if initial_state is None
         else initial_state.to(cdt))  # (batch, H, P, N)
    starts = []
    for c in range(n_chunks):
        starts.append(h)
        h = chunk_decay[:, :, c, None, None] * h + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # (batch, c, H, P, N)

    # 4. each chunk reads the state it starts from, decayed to step t
    y = y + torch.exp(cs).permute(0, 2, 3, 1)[..., None] * torch.einsum("bcthn,bchpn->bcthp", C_h, start_states)
    y = y.reshape(batch, n_chunks * T, heads, headdim)[:, :length]  # (batch, L, H, P)
    if D is not None:
        y = y + (D[:, None] if D.ndim == 1 else D).to(cdt) * xc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(x.dtype)
    return (y, h) if return_final_state else y


def step_sizes(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit, cdt: torch.dtype) -> Tensor:
    """dt (batch, L, H) -> softplus(dt + dt_bias) (or dt + dt_bias), clamped to dt_limit unless it is
    (0, inf), in the compute dtype."""
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if (lo, hi) != (0.0, math.inf):
        dt = dt.clamp(min=lo, max=hi)
    return dt
