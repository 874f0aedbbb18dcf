"""causal_conv1d's entry points over `mambakit.ops`: causal_conv1d_fn with packed sequences
(seq_idx), causal_conv1d_update with a linear or circular (cache_seqlens) state buffer and
continuous batching (conv_state_indices)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .packing import pack_seq_idx


def conv_activation(activation) -> str | None:
    """The official activations (None, "silu", "swish"; True for silu) as mambakit's (None or "silu")."""
    if activation in (None, False):
        return None
    if activation is True or activation in ("silu", "swish"):
        return "silu"
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal_conv1d.causal_conv1d_fn: x (batch, dim, L), weight (dim, width); seq_idx (batch, L)
    int32 marks packed sequences (no input crosses a change of id; tokens with a negative id are
    padding and give 0), as officially without initial or final states. Returns out, or (out,
    final_states) with final_states (batch, dim, width-1), written into final_states_out if given."""
    act = conv_activation(activation)
    if seq_idx is not None:
        if initial_states is not None or return_final_states:
            raise ValueError("causal_conv1d_fn: with seq_idx, initial_states must be None and return_final_states "
                             "False (as in causal_conv1d)")
        return _conv_packed(x, weight, bias, act, seq_idx)
    want_final = return_final_states or final_states_out is not None
    result = ops.causal_conv1d(x, weight, bias, act, initial_state=initial_states, return_final_state=want_final)
    if final_states_out is None:
        return result
    out, final = result
    final_states_out.copy_(final)
    return (out, final_states_out) if return_final_states else out


def _conv_packed(x, weight, bias, act, seq_idx):
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"causal_conv1d_fn: x must be a (batch, dim, L) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    batch, dim, length = x.shape
    packing = pack_seq_idx(seq_idx, batch, length, "causal_conv1d_fn")
    if packing.one_per_row:
        out = ops.causal_conv1d(x, weight, bias, act)
    else:
        rows = x.transpose(0, 1).reshape(1, dim, batch * length)  # (1, dim, batch * L)
        out = ops.causal_conv1d(rows, weight, bias, act, cu_seqlens=packing.cu_seqlens)
        out = out.reshape(dim, batch, length).transpose(0, 1)  # (batch, dim, L)
    return out.masked_fill((seq_idx < 0)[:, None, :], 0)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """causal_conv1d.causal_conv1d_update: x (batch, dim) or (batch, dim, seqlen); conv_state
    (state_batch, dim, state_len >= width-1) holds the past inputs and is updated in place.
    cache_seqlens (batch,) int32: the state is a circular buffer, x written from position
    cache_seqlens % state_len, the conv reading the width-1 entries before it.
    conv_state_indices (batch,) int32: row b uses conv_state[conv_state_indices[b]]; a negative
    index marks padding (output 0, no state touched). Returns out shaped as x."""
    act = conv_activation(activation)
    squeeze = isinstance(x, Tensor) and x.ndim == 2
    xs = x[..., None] if squeeze else x  # (batch, dim, seqlen)
    _check_update(xs, conv_state, weight, cache_seqlens, conv_state_indices)
    if conv_state_indices is None:
        out = _update_rows(xs, conv_state, weight, bias, act, cache_seqlens)
    else:
        out = xs.new_zeros(xs.shape)
        valid = (conv_state_indices >= 0).nonzero().flatten()  # the rows that are not padding
        rows = conv_state_indices[valid].long()
        states = conv_state[rows]  # (valid, dim, state_len), a copy
        lens = None if cache_seqlens is None else cache_seqlens[valid]
        out[valid] = _update_rows(xs[valid], states, weight, bias, act, lens)
        conv_state[rows] = states
    return out[..., 0] if squeeze else out


def _check_update(xs, conv_state, weight, cache_seqlens, conv_state_indices):
    if not isinstance(xs, Tensor) or xs.ndim != 3:
        raise ValueError("causal_conv1d_update: x must be a (batch, dim) or (batch, dim, seqlen) tensor")
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != xs.shape[1]:
        raise ValueError(f"causal_conv1d_update: weight must be (dim, width) with dim={xs.shape[1]} from x, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    batch, dim = xs.shape[:2]
    width = weight.shape[1]
    rows = None if conv_state_indices is not None else batch
    if (not isinstance(conv_state, Tensor) or conv_state.ndim != 3 or conv_state.shape[1] != dim
            or conv_state.shape[2] < width - 1 or (rows is not None and conv_state.shape[0] != rows)):
        got = tuple(conv_state.shape) if isinstance(conv_state, Tensor) else type(conv_state).__name__
        raise ValueError(f"causal_conv1d_update: conv_state must be ({'batch' if rows else 'any'}, dim, "
                         f">= width-1) = ({rows if rows else 'any'}, {dim}, >= {width - 1}), got {got}")
    for name, t in (("cache_seqlens", cache_seqlens), ("conv_state_indices", conv_state_indices)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"causal_conv1d_update: {name} must be an int32 tensor of shape (batch,)")
        if tuple(t.shape) != (batch,):
            raise ValueError(f"causal_conv1d_update: {name} must have shape (batch,) = ({batch},), "
                             f"got {tuple(t.shape)}")
    if conv_state_indices is not None and bool((conv_state_indices >= conv_state.shape[0]).any()):
        raise ValueError(f"causal_conv1d_update: conv_state_indices must be < conv_state's batch "
                         f"{conv_state.shape[0]}, got {conv_state_indices.tolist()}")


def _update_rows(xs, conv_state, weight, bias, act, cache_seqlens):
    """The update over rows that map one to one onto conv_state's rows. xs (batch, dim, seqlen)."""
    width, state_len = weight.shape[1], conv_state.shape[2]
    if cache_seqlens is not None:
        return _update_circular(xs, conv_state, weight, bias, act, cache_seqlens)
    if state_len == width - 1 and conv_state.stride(-1) == 1 and weight.dtype in (torch.float32, torch.float64):
        # mambakit's own layout: the step op (fp32 or fp64 arithmetic, as the weight), token by token
        outs = [ops.causal_conv1d_update(xs[..., t], conv_state, weight, bias, act) for t in range(xs.shape[2])]
        return torch.stack(outs, dim=-1)
    past = conv_state[..., state_len - (width - 1):]  # (batch, dim, width-1): the last inputs
    out = _conv_exact(xs, weight, bias, act, past)
    conv_state.copy_(torch.cat([conv_state, xs.to(conv_state.dtype)], dim=-1)[..., -state_len:])
    return out


def _conv_exact(xs, weight, bias, act, past):
    """The conv of a few new tokens after `past`, accumulated in fp32 (fp64 for fp64 inputs) as the
    official kernel does, returned in x's dtype."""
    cdt = torch.float64 if torch.float64 in (xs.dtype, weight.dtype) else torch.float32
    out = ops.causal_conv1d(xs.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt), act,
                            initial_state=None if past is None else past.to(cdt))
    return out.to(xs.dtype)


def _update_circular(xs, conv_state, weight, bias, act, cache_seqlens):
    """cache_seqlens: the buffer's write position per row (mod state_len); the conv reads the
    width-1 entries before it, then x is written from it on, wrapping around."""
    batch, dim, seqlen = xs.shape
    width, state_len = weight.shape[1], conv_state.shape[2]
    pos = cache_seqlens.to(device=xs.device, dtype=torch.long)[:, None]  # (batch, 1)
    before = torch.remainder(pos + torch.arange(-(width - 1), 0, device=xs.device), state_len)  # (batch, width-1)
    past = conv_state.gather(2, before[:, None, :].expand(batch, dim, width - 1))  # (batch, dim, width-1)
    out = _conv_exact(xs, weight, bias, act, past if width > 1 else None)
    kept = min(seqlen, state_len)  # written one after another, the last state_len tokens are what remains
    where = torch.remainder(pos + torch.arange(seqlen - kept, seqlen, device=xs.device), state_len)  # (batch, kept)
    conv_state.scatter_(2, where[:, None, :].expand(batch, dim, kept), xs[..., seqlen - kept:].to(conv_state.dtype))
    return out
