"""The chunked Mamba-2 (SSD) scan in pure torch: runs on any device and is the CPU default.

L is cut into chunks of T steps (the last one padded with dt = 0, which neither decays nor
feeds the state). Head h reads group g = h // (H / G) of B and C.
  1. Within each chunk, the quadratic dual form y = (M ∘ C Bᵀ)(dt·x), with the decay mask
     M[t, s] = exp(cs_t - cs_s) for s <= t from the chunk's cumulative sum cs of dt·A; the
     differences are masked to the lower triangle before exp, so exp never sees a positive
     number. C Bᵀ is computed once per group, not once per head.
  2. Across chunks, the state h (kept transposed, (N, H/G·P) per group: the layout in which the
     two matmuls below read and write it directly) is carried from chunk to chunk: chunk k reads
     the state it starts from, y_t += exp(cs_t) <h, C_t>, one (T, N) @ (N, H/G·P) matmul, then
     h = exp(cs_end) h + Bᵀ (exp(cs_end - cs_s) dt_s x_s)_s, one (N, T) @ (T, H/G·P) matmul.
Without a backward to record, one state is updated in place chunk after chunk and no chunk's
state is kept; for autograd, every chunk's contribution is one batched matmul, the carry a
list of out-of-place steps, and the reads one batched matmul. Packed sequences (cu_seqlens)
run one sequence at a time (varlen.py).

exp(·) is flushed to zero where it would be subnormal (`_exp_`), as the GPU kernels flush:
a CPU computes with subnormal numbers many times slower.

The chunk length trades the quadratic part (L·T·H work on (T, T) tiles) against the number of
chunks carried; the matmuls of step 2 do the same work at any T. On a CPU, 64 is the fastest
for the official shapes (d_state 128, headdim 64: about 20% faster than 256 for the whole
130m model), which is what the Mamba-2 mixer passes there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import compute_dtype
from .recording import no_autograd
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
    inplace = no_autograd(x, dt, A, B, C, D, z, dt_bias, initial_state)
    batch, length, heads, headdim = x.shape
    T = min(T, length)
    geo = _Chunks(batch, -(-length // T), T, heads, headdim, shape.groups, shape.d_state)

    xc = x.to(cdt)  # (batch, L, H, P)
    step = step_sizes(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (batch, L, H)
    dtx = geo.split(step[..., None] * xc)  # (batch, c, T, H, P), zero-padded
    cs = torch.cumsum(geo.split(step * A.to(cdt)).transpose(2, 3), dim=-1).contiguous()  # (batch, c, H, T)
    B_g = geo.split(B.to(cdt)).transpose(2, 3)  # (batch, c, G, T, N)
    C_g = geo.split(C.to(cdt)).transpose(2, 3)  # (batch, c, G, T, N)

    weights = _intra_weights(geo, cs, B_g, C_g, inplace)  # (batch, c, H, t, s)
    if inplace:
        y, final = _scan_in_place(geo, weights, cs, B_g, C_g, dtx, initial_state, cdt)
    else:
        y = _within_chunks(geo, weights, dtx)  # (batch, c, H, T, P)
        starts = _chunk_start_states(geo, cs, B_g, dtx, initial_state, cdt)  # (batch, c + 1, G, N, hg·P)
        y, final = _read_start_states(geo, y, cs, C_g, starts[:, :-1]), starts[:, -1]  # (batch, c, T, H, P)

    y = y.reshape(batch, geo.n * T, heads, headdim)[:, :length]  # (batch, L, H, P), a view
    if D is not None:
        Dc = (D[:, None] if D.ndim == 1 else D).to(cdt)  # (H, 1) or (H, P)
        y = y.addcmul_(Dc, xc) if inplace else y + Dc * xc
    if z is not None:
        gate = F.silu(z.to(cdt))
        y = y.mul_(gate) if inplace else y * gate
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final = final.view(batch, geo.G, geo.N, geo.hg, headdim).permute(0, 1, 3, 4, 2)  # (batch, G, hg, P, N)
    return y, final.reshape(batch, heads, headdim, geo.N).clone(memory_format=torch.contiguous_format)


class _Chunks:
    """The chunk geometry: batch, n chunks of T steps, H heads of P channels, G groups of N."""

    def __init__(self, batch: int, n: int, T: int, heads: int, headdim: int, groups: int, d_state: int):
        self.batch, self.n, self.T = batch, n, T
        self.H, self.P, self.G, self.N = heads, headdim, groups, d_state
        self.hg = heads // groups  # heads per group

    def split(self, t: Tensor) -> Tensor:
        """(batch, L, ...) -> (batch, c, T, ...), zero-padded to c·T steps (a view when L = c·T)."""
        pad = self.n * self.T - t.shape[1]
        if pad:
            t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
        return t.unflatten(1, (self.n, self.T))


def _intra_weights(geo: _Chunks, cs: Tensor, B_g: Tensor, C_g: Tensor, inplace: bool) -> Tensor:
    """Step 1's matrices, M ∘ C Bᵀ per head: exp(cs_t - cs_s) <C_t, B_s> for s <= t, else 0.
    cs (batch, c, H, T); B_g, C_g (batch, c, G, T, N) -> (batch, c, H, t, s)."""
    b, c, T, G, hg = geo.batch, geo.n, geo.T, geo.G, geo.hg
    CB = torch.matmul(C_g, B_g.transpose(-1, -2))[:, :, :, None]  # (batch, c, G, 1, t, s), once per group
    diff = cs[..., :, None] - cs[..., None, :]  # (batch, c, H, t, s)
    causal = torch.ones(T, T, dtype=torch.bool, device=cs.device).tril()
    decay = _exp_(diff.masked_fill_(~causal, -math.inf)).view(b, c, G, hg, T, T)  # 0 above the diagonal
    return (decay.mul_(CB) if inplace else decay * CB).view(b, c, geo.H, T, T)


def _within_chunks(geo: _Chunks, weights: Tensor, dtx: Tensor) -> Tensor:
    """Step 1, the dual form within each chunk: y[t] = sum_{s <= t} weights[t, s] dt_s x_s.
    weights (batch, c, H, t, s); dtx (batch, c, T, H, P) -> y (batch, c, H, T, P)."""
    return torch.matmul(weights, dtx.transpose(2, 3))


def _weighted_inputs(geo: _Chunks, cs: Tensor, dtx: Tensor) -> Tensor:
    """exp(cs_end - cs_s) dt_s x_s, what step s adds to its chunk's end state, per group:
    (batch, c, T, H, P) -> (batch, c, T, G, hg·P)."""
    to_end = _exp_(cs[..., -1:] - cs)  # (batch, c, H, T)
    return (dtx * to_end.transpose(2, 3)[..., None]).view(geo.batch, geo.n, geo.T, geo.G, geo.hg * geo.P)


def _initial_state(geo: _Chunks, initial_state: Tensor | None, cdt: torch.dtype, device) -> Tensor:
    """initial_state (batch, H, P, N), or zeros, in the layout of the carried states: (batch, G,
    N, hg·P), each state transposed, (N, P) per head, heads of a group side by side: the layout
    in which both matmuls that touch it read and write it directly."""
    b, G, hg, P, N = geo.batch, geo.G, geo.hg, geo.P, geo.N
    if initial_state is None:
        return torch.zeros(b, G, N, hg * P, dtype=cdt, device=device)
    h = initial_state.to(cdt).view(b, G, hg, P, N).permute(0, 1, 4, 2, 3)  # (batch, G, N, hg, P)
    return h.reshape(b, G, N, hg * P).clone(memory_format=torch.contiguous_format)


def _scan_in_place(geo: _Chunks, weights: Tensor, cs: Tensor, B_g: Tensor, C_g: Tensor, dtx: Tensor,
                   initial_state: Tensor | None, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Steps 1 and 2 with nothing to record for a backward, chunk after chunk: one state (batch,
    G, N, hg·P) carried in place, so that no chunk's state is stored, and chunk k's output written
    over its dt·x once read (a fresh big tensor costs a CPU its page faults). Chunk k: y = its
    dual form + exp(cs_t) <h, C_t>, then h = exp(cs_end) h + Bᵀ (exp(cs_end - cs_s) dt_s x_s)_s.
    weights (batch, c, H, t, s); dtx (batch, c, T, H, P), overwritten -> (y (batch, c, T, H, P),
    the final state (batch, G, N, hg·P))."""
    b, c, T, G, hg, P, N = geo.batch, geo.n, geo.T, geo.G, geo.hg, geo.P, geo.N
    to_end = _exp_(cs[..., -1:] - cs).transpose(2, 3)[..., None]  # (batch, c, T, H, 1): exp(cs_end - cs_s)
    decay = _exp_(cs[..., -1].clone()).view(b, c, G, 1, hg, 1)  # exp(cs_end) per head
    scale = _exp_(cs.clone()).transpose(2, 3)[..., None]  # (batch, c, T, H, 1): exp(cs_t)
    h = _initial_state(geo, initial_state, cdt, cs.device)  # (batch, G, N, hg·P)
    for k in range(c):
        x_k = dtx[:, k]  # (batch, T, H, P)
        y_k = torch.matmul(weights[:, k], x_k.transpose(1, 2)).transpose(1, 2)  # (batch, T, H, P), a view
        inputs = (x_k * to_end[:, k]).view(b, T, G, hg * P).transpose(1, 2)  # (batch, G, T, hg·P)
        if k or initial_state is not None:
            read = torch.matmul(C_g[:, k], h).transpose(1, 2).reshape(b, T, geo.H, P)  # <h, C_t>, a view when G = 1
            torch.addcmul(y_k, read, scale[:, k], out=x_k)
            h.view(b, G, N, hg, P).mul_(decay[:, k])
        else:  # the first chunk starts from zeros
            x_k.copy_(y_k)
        h.view(b * G, N, hg * P).baddbmm_(B_g[:, k].reshape(b * G, T, N).transpose(1, 2),
                                          inputs.reshape(b * G, T, hg * P))
    return dtx, h


def _chunk_start_states(geo: _Chunks, cs: Tensor, B_g: Tensor, dtx: Tensor, initial_state: Tensor | None,
                        cdt: torch.dtype) -> Tensor:
    """Step 2's carry, recorded for autograd: the state each chunk starts from and, last, the final
    state, (batch, c + 1, G, N, hg·P), carried from initial_state (zeros when None) through
    h_c = exp(cs_end) h_{c-1} + the chunk's own contribution, one matmul for every chunk's."""
    b, c, G, hg, P, N = geo.batch, geo.n, geo.G, geo.hg, geo.P, geo.N
    per_group = _weighted_inputs(geo, cs, dtx).transpose(2, 3)  # (batch, c, G, T, hg·P)
    own = torch.matmul(B_g.transpose(-1, -2), per_group).view(b, c, G, N, hg, P)  # sum_s B_s ⊗ weighted_s
    decay = _exp_(cs[..., -1].clone()).view(b, c, G, 1, hg, 1)  # exp(cs_end) per head
    hs = [_initial_state(geo, initial_state, cdt, cs.device).view(b, G, N, hg, P)]
    for k in range(c):
        hs.append(own[:, k] + decay[:, k] * hs[-1])
    return torch.stack(hs, dim=1).view(b, c + 1, G, N, hg * P)


def _read_start_states(geo: _Chunks, y: Tensor, cs: Tensor, C_g: Tensor, starts: Tensor) -> Tensor:
    """Step 2's reads, recorded for autograd: y (batch, c, H, T, P) plus what each chunk reads of the
    state it starts from, starts (batch, c, G, N, hg·P): exp(cs_t) <h_start, C_t>, one (T, N) @
    (N, hg·P) matmul per (chunk, group). Returns (batch, c, T, H, P): y's transpose comes with the sum."""
    b, c, T, P = geo.batch, geo.n, geo.T, geo.P
    read = torch.matmul(C_g, starts)  # (batch, c, G, T, hg·P)
    read = read.transpose(2, 3).reshape(b, c, T, geo.H, P)  # a view when G = 1
    scale = _exp_(cs.clone()).transpose(2, 3)[..., None]  # (batch, c, T, H, 1): exp(cs_t)
    return read * scale + y.transpose(2, 3)


def _exp_(t: Tensor) -> Tensor:
    """exp(t) in place on t, a fresh tensor of exponents <= 0, with 0 where the result would be
    subnormal (t below log of the dtype's smallest normal number): the flush-to-zero of the GPU
    kernels. Subnormal numbers make a CPU's exp and every product that reads them many times
    slower; the values flushed are under 1e-38 (fp32) of the terms they weight."""
    return F.threshold_(t, math.log(torch.finfo(t.dtype).tiny), -math.inf).exp_()


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
