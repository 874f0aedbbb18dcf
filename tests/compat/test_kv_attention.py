"""mambakit.compat.flash_attn_with_kvcache against a per-query float64 softmax written from
flash_attn's documented semantics: new keys and values appended in place at cache_seqlens, the
causal mask aligned bottom-right, a sliding window, grouped heads, cache_batch_idx."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit.compat import flash_attn_with_kvcache

FAST = settings(max_examples=30, deadline=None, derandomize=True)


def reference(q, k_cache, v_cache, k, v, cache_seqlens, rows, causal, window):
    """Query by query: the cache rows after the write, the visible keys, softmax in float64."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch, length_q, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = torch.zeros(batch, length_q, heads, dim, dtype=torch.float64)
    for b in range(batch):
        r, held = rows[b], cache_seqlens[b]
        new = 0 if k is None else k.shape[1]
        for i in range(new):
            k_cache[r, held + i], v_cache[r, held + i] = k[b, i], v[b, i]
        total = held + new
        for i in range(length_q):
            position = total - length_q + i
            keys = [j for j in range(total)
                    if (not causal or j <= position) and (window[0] < 0 or j >= position - window[0])
                    and (causal or window[1] < 0 or j <= position + window[1])]
            for h in range(heads):
                if not keys:
                    continue
                kk = k_cache[r, keys, h // group].double()  # (n, d)
                scores = kk @ q[b, i, h].double() / math.sqrt(dim)
                out[b, i, h] = torch.softmax(scores, 0) @ v_cache[r, keys, h // group].double()
    return out, k_cache, v_cache


@FAST
@given(batch=st.integers(1, 3), length_q=st.integers(1, 4), new=st.integers(0, 4), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2]), causal=st.booleans(), left=st.sampled_from([-1, 0, 3]),
       shuffled=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_the_per_query_softmax(batch, length_q, new, kv_heads, group, causal, left, shuffled, seed):
    g = torch.Generator().manual_seed(seed)
    slots, dim, heads = 12, 8, kv_heads * group
    cache_batch = batch + 1
    q = torch.randn(batch, length_q, heads, dim, generator=g)
    k_cache = torch.randn(cache_batch, slots, kv_heads, dim, generator=g)
    v_cache = torch.randn(cache_batch, slots, kv_heads, dim, generator=g)
    k = torch.randn(batch, new, kv_heads, dim, generator=g) if new else None
    v = torch.randn(batch, new, kv_heads, dim, generator=g) if new else None
    held = torch.randint(0, slots - new + 1, (batch,), generator=g)
    rows = torch.randperm(cache_batch, generator=g)[:batch] if shuffled else torch.arange(batch)
    want, want_k, want_v = reference(q, k_cache, v_cache, k, v, held.tolist(), rows.tolist(), causal, (left, -1))
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=held.int(),
                                  cache_batch_idx=rows.int() if shuffled else None, causal=causal,
                                  window_size=(left, -1))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0)  # written in place, nothing else touched
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0)


def test_an_int_length_and_the_decoding_step_of_a_growing_cache():
    """Step by step, one key at a time with an int cache_seqlens, equals causal attention over the
    whole sequence at once."""
    torch.manual_seed(0)
    length, heads, dim = 7, 2, 4
    q, k, v = (torch.randn(1, length, heads, dim) for _ in range(3))
    k_cache, v_cache = torch.zeros(1, 10, heads, dim), torch.zeros(1, 10, heads, dim)
    steps = [flash_attn_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1], v[:, t:t + 1], cache_seqlens=t,
                                     causal=True) for t in range(length)]
    whole = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             is_causal=True).transpose(1, 2)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(rotary_cos=torch.ones(4, 2)), "rotary_cos"),
    (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "block_table"),
    (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
    (dict(softcap=30.0), "softcap"),
    (dict(return_softmax_lse=True), "return_softmax_lse"),
    (dict(cache_seqlens=torch.ones(3)), "cache_seqlens"),
    (dict(cache_batch_idx=torch.zeros(2, dtype=torch.int32)), "cache_batch_idx"),
])
def test_what_it_does_not_do_is_refused_by_name(kwargs, name):
    q, cache = torch.randn(1, 1, 2, 4), torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match=name):
        flash_attn_with_kvcache(q, cache, cache.clone(), **kwargs)


@pytest.mark.parametrize("shapes, name", [
    (((1, 1, 3, 4), (1, 8, 2, 4)), "heads"),
    (((1, 1, 2, 4), (1, 8, 2, 6)), "head dim"),
    (((2, 1, 2, 4), (1, 8, 2, 4)), "rows"),
    (((1, 2, 4), (1, 8, 2, 4)), "q must"),
])
def test_bad_shapes_are_named(shapes, name):
    (q_shape, cache_shape) = shapes
    with pytest.raises(ValueError, match=name):
        flash_attn_with_kvcache(torch.randn(q_shape), torch.zeros(cache_shape), torch.zeros(cache_shape))
