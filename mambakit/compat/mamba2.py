"""mamba_ssm's Mamba-2 entry points over `mambakit.ops.ssd`: mamba_chunk_scan_combined (the SSD
scan, with packed sequences marked by seq_idx and the per-sequence final states), and
mamba_split_conv1d_scan_combined (in_proj's output -> conv -> SSD -> grouped gated RMSNorm ->
out_proj, the Mamba-2 layer after in_proj) composed from mambakit's ops, differentiable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .conv import causal_conv1d_fn, conv_activation
from .packing import pack_seq_idx, single_sequences


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                              return_final_states=False, return_varlen_states=False, state_dtype=None):
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined. x, z (batch, L, H, P); dt
    (batch, L, H); A, dt_bias (H,); B, C (batch, L, G, N); D (H,) or (H, P); initial_states
    (batch, H, P, N); seq_idx (batch, L) int32: packed sequences (see packing.py); cu_seqlens
    (S+1,): the same sequences' offsets, read only with return_varlen_states (batch 1).
    Returns out (batch, L, H, P), then final_states (batch, H, P, N) if return_final_states, then
    the per-sequence final states (S, H, P, N) if return_varlen_states; states in state_dtype
    (default C's dtype), as officially."""
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("mamba_chunk_scan_combined: return_varlen_states=True needs cu_seqlens")
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), chunk_size=chunk_size)
    if seq_idx is None and not return_varlen_states:
        result = ops.ssd(x, dt, A, B, C, z=z, initial_state=initial_states, return_final_state=return_final_states,
                         **kw)
        if not return_final_states:
            return result
        return result[0], _state_out(result[1], C, state_dtype)
    out, final, per_sequence, packing = _scan_packed(x, dt, A, B, C, z, initial_states, seq_idx, kw)
    results = [out]
    if return_final_states:
        results.append(_state_out(final, C, state_dtype))
    if return_varlen_states:
        _check_varlen(cu_seqlens, packing)
        results.append(_state_out(per_sequence, C, state_dtype))
    return tuple(results) if len(results) > 1 else out


def _scan_packed(x, dt, A, B, C, z, initial_states, seq_idx, kw):
    """The scan with its state restarting at each sequence of seq_idx (rows laid end to end).
    Returns (out, final state per row, final state per sequence, packing)."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"mamba_chunk_scan_combined: x must be a (batch, L, H, P) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    batch, length = x.shape[:2]
    packing = (single_sequences(batch, length, x.device) if seq_idx is None
               else pack_seq_idx(seq_idx, batch, length, "mamba_chunk_scan_combined"))
    h0 = None if initial_states is None else packing.initial_states(initial_states)
    if packing.one_per_row:
        out, finals = ops.ssd(x, dt, A, B, C, z=z, initial_state=h0, return_final_state=True, **kw)
        return out, finals, finals, packing
    flat = packing.flatten
    out, finals = ops.ssd(flat(x), flat(dt), A, flat(B), flat(C), z=flat(z), initial_state=h0,
                          return_final_state=True, cu_seqlens=packing.cu_seqlens, **kw)
    return packing.unflatten(out), finals[packing.row_last.to(finals.device)], finals, packing


def _check_varlen(cu_seqlens, packing) -> None:
    if packing.batch != 1:
        raise ValueError(f"mamba_chunk_scan_combined: return_varlen_states needs batch 1, got batch {packing.batch}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.ndim != 1:
        raise ValueError("mamba_chunk_scan_combined: cu_seqlens must be a 1-D tensor of S+1 offsets")
    if cu_seqlens.tolist() != packing.cu_seqlens.tolist():
        raise ValueError(f"mamba_chunk_scan_combined: cu_seqlens {cu_seqlens.tolist()} must mark the sequences "
                         f"that seq_idx marks ({packing.cu_seqlens.tolist()}): the state restarts only where "
                         "seq_idx changes")


def _state_out(state: Tensor, C, state_dtype) -> Tensor:
    return state.to(state_dtype if state_dtype is not None else C.dtype)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, math.inf),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True, state_dtype=None):
    """mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined. zxbcdt (batch, L,
    2*d_mlp + 2*dim + 2*ngroups*N + H) = [x0 z0 | z | x B C | dt] with dim = H * headdim;
    conv1d_weight (dim + 2*ngroups*N, width); dt_bias, A (H,); D (H,) (then headdim is needed) or
    (H, headdim); rmsnorm_weight (dim,): y = RMSNorm over groups of dim // ngroups channels, gated
    by SiLU(z) after (norm_before_gate) or before the norm; without it, y * SiLU(z). The d_mlp
    part gives SiLU(x0) * z0 in front of y. Returns out (batch, L, out_dim or dim) [, final_states]."""
    heads, headdim, dim, d_state, d_mlp = _split_sizes(zxbcdt, conv1d_weight, dt_bias, A, D, headdim, ngroups)
    if outproj_weight is None and outproj_bias is not None:
        raise ValueError("mamba_split_conv1d_scan_combined: outproj_bias needs outproj_weight")
    if rmsnorm_weight is not None and tuple(rmsnorm_weight.shape) != (dim,):
        raise ValueError(f"mamba_split_conv1d_scan_combined: rmsnorm_weight must be (dim,) = ({dim},), "
                         f"got {tuple(rmsnorm_weight.shape)}")
    batch, length = zxbcdt.shape[:2]
    x0z0, z, xBC, dt = torch.split(zxbcdt, [2 * d_mlp, dim, dim + 2 * ngroups * d_state, heads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                           activation=conv_activation(activation)).transpose(1, 2)  # (batch, L, conv dim)
    x, B, C = torch.split(xBC, [dim, ngroups * d_state, ngroups * d_state], dim=-1)
    z = z.reshape(batch, length, heads, headdim)
    scan = mamba_chunk_scan_combined(
        x.reshape(batch, length, heads, headdim), dt, A, B.reshape(batch, length, ngroups, d_state),
        C.reshape(batch, length, ngroups, d_state), chunk_size, D=D, z=z if rmsnorm_weight is None else None,
        dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states, state_dtype=state_dtype)
    y, final = scan if return_final_states else (scan, None)
    y = y.reshape(batch, length, dim)
    if rmsnorm_weight is not None:
        y = ops.gated_rms_norm(y, z.reshape(batch, length, dim), rmsnorm_weight, rmsnorm_eps, dim // ngroups,
                               norm_before_gate)
    if d_mlp > 0:
        x0, z0 = x0z0.chunk(2, dim=-1)
        y = torch.cat([(F.silu(x0) * z0).to(y.dtype), y], dim=-1)  # (batch, L, d_mlp + dim)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def _split_sizes(zxbcdt, conv1d_weight, dt_bias, A, D, headdim, ngroups):
    """(H, headdim, dim, N, d_mlp) from the arguments' shapes, checked as the official asserts them."""
    name = "mamba_split_conv1d_scan_combined"
    for arg, t, ndim in (("zxbcdt", zxbcdt, 3), ("conv1d_weight", conv1d_weight, 2), ("D", D, (1, 2)),
                         ("A", A, 1), ("dt_bias", dt_bias, 1)):
        if not isinstance(t, Tensor) or t.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a tensor with {ndim} dims, got {got}")
    if D.ndim == 1:
        if headdim is None:
            raise ValueError(f"{name}: with D of shape (nheads,), headdim must be given")
        heads = D.shape[0]
    else:
        heads, headdim = D.shape
    if isinstance(ngroups, bool) or not isinstance(ngroups, int) or ngroups < 1 or heads % ngroups:
        raise ValueError(f"{name}: ngroups must be a positive int dividing nheads={heads}, got {ngroups!r}")
    dim = heads * headdim
    d_state = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_mlp = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * d_state - heads) // 2
    if d_state < 1 or conv1d_weight.shape[0] != dim + 2 * ngroups * d_state or d_mlp < 0 \
            or zxbcdt.shape[-1] != 2 * d_mlp + 2 * dim + 2 * ngroups * d_state + heads:
        raise ValueError(f"{name}: zxbcdt {tuple(zxbcdt.shape)} and conv1d_weight {tuple(conv1d_weight.shape)} must "
                         f"be (batch, L, 2*d_mlp + 2*dim + 2*ngroups*N + nheads) and (dim + 2*ngroups*N, width) with "
                         f"dim = nheads*headdim = {dim}, ngroups = {ngroups}, nheads = {heads}")
    for arg, t in (("A", A), ("dt_bias", dt_bias)):
        if tuple(t.shape) != (heads,):
            raise ValueError(f"{name}: {arg} must have shape (nheads,) = ({heads},), got {tuple(t.shape)}")
    return heads, headdim, dim, d_state, d_mlp

