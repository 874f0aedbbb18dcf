"""flash_attn's `flash_attn_with_kvcache` over torch's scaled_dot_product_attention, for code that
decodes with it where flash_attn is not installed (the official `mamba_ssm` MHA layer of a hybrid
model calls it at every decoding step, and without it attends with a mask that is wrong for a
single query).

The subset: a contiguous (not paged) cache, new keys and values appended in place at each row's
cache_seqlens, cache_batch_idx, causal attention aligned bottom-right (the last query sees the last
key), a sliding window, grouped heads. Rotary embeddings, paged caches, ALiBi, soft-capping and the
log-sum-exp output are refused with a ValueError naming the argument. No host sync: a CUDA graph
captures it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_NAME = "flash_attn_with_kvcache"


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q (batch, Lq, H, d); k_cache, v_cache (cache_batch, S, Hkv, d); k, v (batch, Lnew, Hkv, d) or
    None; cache_seqlens: an int or (batch,) int tensor, the positions each row's cache holds.
    k and v are written into the cache at positions cache_seqlens.., in place; then each query
    attends to the first cache_seqlens + Lnew positions (query i of Lq sitting at position
    cache_seqlens + Lnew - Lq + i when causal). Returns the output (batch, Lq, H, d).
    num_splits is a performance hint of flash_attn's and is ignored."""
    _refuse(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_leftpad=cache_leftpad, block_table=block_table,
            alibi_slopes=alibi_slopes)
    if softcap:
        raise ValueError(f"{_NAME}: softcap is not supported here (got {softcap})")
    if return_softmax_lse:
        raise ValueError(f"{_NAME}: return_softmax_lse is not supported here")
    batch, length_q, heads, dim = _check(q, k_cache, v_cache, k, v)
    rows = _rows(cache_batch_idx, batch, k_cache.shape[0], q.device)  # (batch,) which cache row each uses
    held = _lengths(cache_seqlens, batch, q.device)  # (batch,) positions already in the cache
    length_new = 0
    if k is not None:
        length_new = k.shape[1]
        where = held[:, None] + torch.arange(length_new, device=q.device)  # (batch, Lnew)
        k_cache[rows[:, None], where] = k.to(k_cache.dtype)
        v_cache[rows[:, None], where] = v.to(v_cache.dtype)
    if cache_batch_idx is None:  # the first rows, as views: no copy of the cache at each step
        keys, values = k_cache[:batch].transpose(1, 2), v_cache[:batch].transpose(1, 2)  # (batch, Hkv, S, d)
    else:
        keys, values = k_cache[rows].transpose(1, 2), v_cache[rows].transpose(1, 2)
    total = held + length_new  # (batch,) keys each row attends over
    visible = _visible(total, length_q, keys.shape[2], causal, window_size)  # (batch, Lq, S)
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                         attn_mask=visible[:, None], scale=scale,
                                         enable_gqa=heads != keys.shape[1])  # (batch, H, Lq, d)
    out = out.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)  # a query that sees nothing gives 0
    return out.transpose(1, 2).contiguous()


def _visible(total: Tensor, length_q: int, slots: int, causal: bool, window_size) -> Tensor:
    """Which of the cache's slots each query sees: (batch, Lq, S) bool."""
    key = torch.arange(slots, device=total.device)  # (S,)
    query = total[:, None] - length_q + torch.arange(length_q, device=total.device)  # (batch, Lq): positions
    mask = key[None, None, :] < total[:, None, None]
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        mask = mask & (key[None, None, :] <= query[:, :, None] + right)
    if left >= 0:
        mask = mask & (key[None, None, :] >= query[:, :, None] - left)
    return mask


def _refuse(**given) -> None:
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{_NAME}: {name} is not supported here (only a contiguous cache without rotary "
                             f"embeddings or ALiBi)")


def _check(q, k_cache, v_cache, k, v) -> tuple[int, int, int, int]:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(f"{_NAME}: {name} must be a 4-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    batch, length_q, heads, dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_NAME}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != dim:
        raise ValueError(f"{_NAME}: k_cache's head dim {k_cache.shape[3]} is not q's {dim}")
    if heads % kv_heads:
        raise ValueError(f"{_NAME}: q's {heads} heads are not a multiple of the cache's {kv_heads}")
    if (k is None) != (v is None):
        raise ValueError(f"{_NAME}: k and v come together (got only {'k' if v is None else 'v'})")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.ndim != 4 or t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{_NAME}: {name} must be (batch={batch}, L, {kv_heads}, {dim}), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if k.shape != v.shape:
            raise ValueError(f"{_NAME}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    return batch, length_q, heads, dim


def _rows(cache_batch_idx, batch: int, cache_batch: int, device) -> Tensor:
    if cache_batch_idx is None:
        if cache_batch < batch:
            raise ValueError(f"{_NAME}: the cache holds {cache_batch} rows, fewer than q's batch {batch}")
        return torch.arange(batch, device=device)
    if not isinstance(cache_batch_idx, Tensor) or cache_batch_idx.shape != (batch,) or cache_batch_idx.is_floating_point():
        raise ValueError(f"{_NAME}: cache_batch_idx must be a (batch={batch},) integer tensor")
    return cache_batch_idx.to(device=device, dtype=torch.long)


def _lengths(cache_seqlens, batch: int, device) -> Tensor:
    if cache_seqlens is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if isinstance(cache_seqlens, int):
        return torch.full((batch,), cache_seqlens, dtype=torch.long, device=device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.is_floating_point() or cache_seqlens.numel() not in (1, batch):
        raise ValueError(f"{_NAME}: cache_seqlens must be an int or a (batch={batch},) integer tensor")
    return cache_seqlens.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
