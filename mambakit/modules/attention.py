"""Causal multi-head attention, the mixer of a hybrid's attention layers, in the official
mamba_ssm MHA's layout: `in_proj` makes q (num_heads heads), k and v (num_heads_kv heads each:
grouped or multi-query attention when fewer), an optional causal depthwise `conv1d` over them
(no activation), a rotary embedding on the leading `rotary_emb_dim` channels of each q and k
head, `torch.nn.functional.scaled_dot_product_attention` (flash attention on the GPU), and
`out_proj`. `window_size` (mambakit's) lets each query see only its window_size most recent
tokens, itself included.

The KV cache (`AttentionState`) is pre-allocated: slot p % T of its T slots holds position p's
key and value (after the rotary embedding), and `lengths` counts the tokens each row has taken
in, so rows of a batch may sit at different positions (prompts of different lengths, packed
with cu_seqlens at prefill). With a window the slots form a ring of window_size slots, so the
cache stops growing there. `step` writes one token per row in place and attends over every
slot under a mask built from `lengths`: it runs on fixed buffers with no host sync, so a
CUDA graph can capture it. Outside a capture, the CPU attends over the slots in use only.

As every mixer, it owns its parameters and calls its submodules (`self.in_proj(x)`), so
wrappers (LoRA, quantised Linear, hooks) change what runs; `conv1d`'s fused op reads its weight
only where it is a plain nn.Conv1d (`is_plain`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .state import is_plain, one_token, sequence_input


@dataclass
class AttentionState:
    """The KV cache of one attention layer, for B rows."""
    k: torch.Tensor  # (B, Hkv, T, head_dim): keys after the rotary embedding, position p in slot p % T
    v: torch.Tensor  # (B, Hkv, T, head_dim)
    lengths: torch.Tensor  # (B,) int64: the tokens each row has taken in (its next position)
    conv: torch.Tensor | None = None  # (B, qkv_dim, d_conv - 1): the qkv conv's last inputs
    window: int | None = None  # the sliding window: T never grows past it (the slots are a ring)
    filled: int | None = None  # a host-side bound on lengths.max(), so that growing and slicing need no
    # sync; read from lengths once (a sync) when not given

    def __post_init__(self) -> None:
        if self.filled is None:
            self.filled = int(self.lengths.max()) if self.lengths.numel() else 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.lengths, self.conv) if t is not None]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def reserve(self, positions: int) -> None:
        """Room for `positions` positions per row (at most the window's): the slots grow,
        at least doubling, and keep what they hold. Growing happens before any row has wrapped
        around (a row wraps only in a full ring), so slot p holds position p in both."""
        want = positions if self.window is None else min(positions, self.window)
        have = self.capacity
        if want <= have:
            return
        grown = max(want, 2 * have)
        if self.window is not None:
            grown = min(grown, self.window)
        batch, heads, _, head_dim = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(batch, heads, grown, head_dim)  # zeros: a masked slot must not hold NaN
            new[:, :, :have] = old
            setattr(self, name, new)

    def rows(self, start: int, stop: int) -> "AttentionState":
        """Rows start..stop-1 as views: writes through them land in this cache."""
        conv = None if self.conv is None else self.conv[start:stop]
        return AttentionState(self.k[start:stop], self.v[start:stop], self.lengths[start:stop], conv, self.window,
                              self.filled)

    def copy_(self, other: "AttentionState") -> None:
        """Every slot, length and conv input of `other` (the same capacity) copied in place; the
        host bound is read back once (a sync)."""
        self.k.copy_(other.k)
        self.v.copy_(other.v)
        self.lengths.copy_(other.lengths)
        if self.conv is not None:
            self.conv.copy_(other.conv)
        self.filled = int(other.lengths.max()) if other.lengths.numel() else 0


@dataclass
class KVHistory:
    """What chunked training carries from one chunk to the next: every earlier key and value
    (the last window_size - 1 with a window), in order, and the conv's last inputs. Not updated
    in place, so that gradients flow back through it."""
    k: torch.Tensor  # (B, Hkv, T, head_dim)
    v: torch.Tensor  # (B, Hkv, T, head_dim)
    conv: torch.Tensor | None = None  # (B, qkv_dim, d_conv - 1)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_heads_kv: int | None = None, head_dim: int | None = None,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, softmax_scale: float | None = None,
                 d_conv: int = 0, rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0,
                 rotary_emb_interleaved: bool = False, window_size: int | None = None, layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads = d_model, num_heads
        self.num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        self.head_dim = d_model // num_heads if head_dim is None else head_dim
        if num_heads % self.num_heads_kv:
            raise ValueError(f"num_heads_kv ({self.num_heads_kv}) must divide num_heads ({num_heads})")
        if rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"rotary_emb_dim ({rotary_emb_dim}) must be even and <= head_dim ({self.head_dim})")
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size must be None or >= 1, got {window_size}")
        self.softmax_scale, self.d_conv, self.window_size = softmax_scale, d_conv, window_size
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, float(rotary_emb_base)
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.layer_idx = layer_idx
        self.qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(d_model, self.qkv_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, d_conv, groups=self.qkv_dim, padding=d_conv - 1,
                                    **factory)
        self.out_proj = nn.Linear(num_heads * self.head_dim, d_model, bias=out_proj_bias, **factory)

    # ---- the cache ---------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, device=None, dtype=None, max_seqlen: int = 0) -> AttentionState:
        """An empty KV cache with room for max_seqlen positions per row (the window's at most);
        forward grows it when a prompt needs more, and LMCache.reserve before decoding."""
        device = device or self.out_proj.weight.device
        dtype = dtype or _float_dtype(self.in_proj)
        slots = max_seqlen if self.window_size is None else min(max_seqlen, self.window_size)
        shape = (batch_size, self.num_heads_kv, slots, self.head_dim)
        conv = None
        if self.d_conv > 0:
            conv = torch.zeros(batch_size, self.qkv_dim, self.d_conv - 1, device=device,
                               dtype=_float_dtype(self.conv1d))
        k, v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        return AttentionState(k, v, torch.zeros(batch_size, device=device, dtype=torch.int64), conv, self.window_size,
                              filled=0)

    def check_state(self, state: AttentionState, batch: int) -> None:
        """A ValueError naming the shapes unless `state` is a KV cache of this layer at `batch`."""
        if not isinstance(state, AttentionState):
            raise TypeError(f"an attention layer's cache must be an AttentionState, got {type(state).__name__}")
        want = (batch, self.num_heads_kv, self.head_dim)
        for name in ("k", "v"):
            t = getattr(state, name)
            if t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                raise ValueError(f"the KV cache's {name} has shape {tuple(t.shape)}; this layer and batch need "
                                 f"(B={batch}, heads={self.num_heads_kv}, T, head_dim={self.head_dim})")
        if tuple(state.lengths.shape) != (batch,):
            raise ValueError(f"the KV cache's lengths have shape {tuple(state.lengths.shape)}, expected ({batch},)")
        want_conv = (batch, self.qkv_dim, self.d_conv - 1) if self.d_conv > 0 else None
        have_conv = None if state.conv is None else tuple(state.conv.shape)
        if have_conv != want_conv:
            raise ValueError(f"the KV cache's conv state has shape {have_conv}, this layer needs {want_conv}")

    # ---- running -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, cache: AttentionState | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model), each position attending to the
        earlier ones (and the cache's). With a cache, its rows continue from their own
        positions, and the new keys and values are written into it. With cu_seqlens (S + 1,),
        the batch is one row of S packed sequences, each attending within itself only (and to
        its own row of a cache of batch S)."""
        batch, length = sequence_input("Attention", hidden_states, self.d_model, cu_seqlens)
        if cu_seqlens is not None:
            ops.check_cu_seqlens(cu_seqlens, length, batch)  # offsets 0..L, no empty sequence
        if cache is not None:
            self.check_state(cache, batch if cu_seqlens is None else cu_seqlens.numel() - 1)
        qkv = self.in_proj(hidden_states)  # (B, L, qkv_dim)
        if cu_seqlens is not None:
            return self.out_proj(self._packed(qkv, cache, cu_seqlens))
        if self.d_conv > 0:
            qkv, final_conv = self._conv(qkv, None if cache is None else cache.conv)
            if cache is not None:
                cache.conv.copy_(final_conv)
        if cache is None:
            q, k, v = self._heads(qkv, torch.arange(length, device=qkv.device)[None])
            out = self._attend(q, k, v)
        else:
            cache.reserve(cache.filled + length)
            positions = cache.lengths[:, None] + torch.arange(length, device=qkv.device)  # (B, L)
            q, k, v = self._heads(qkv, positions)
            out = self._attend_cached(q, k, v, cache)
        return self.out_proj(_merge_heads(out))

    def step(self, hidden_states: torch.Tensor, cache: AttentionState) -> torch.Tensor:
        """One token per row: hidden_states (B, d_model) or (B, 1, d_model) -> the same shape.
        Its key and value go into slot lengths % T of each row, in place; fixed shapes and no
        host sync (a CUDA graph captures it). The cache must have room (LMCache.reserve)."""
        hidden_states, squeeze = one_token(hidden_states, self.d_model)
        batch = hidden_states.shape[0]
        self.check_state(cache, batch)
        needed = cache.filled + 1 if self.window_size is None else min(cache.filled + 1, self.window_size)
        if needed > cache.capacity and not hidden_states.is_cuda:
            # (on CUDA the host bound is not kept by a graph's replays; MambaLM.step reserves)
            raise ValueError(f"the KV cache is full ({cache.capacity} positions): reserve room before stepping "
                             f"(LMCache.reserve, or generate, which does)")
        qkv = self.in_proj(hidden_states)  # (B, qkv_dim)
        if self.d_conv > 0:
            qkv = self._conv_step(qkv, cache.conv)
        q, k, v = self._heads(qkv[:, None], cache.lengths[:, None])  # (B, H|Hkv, 1, head_dim)
        out = self.out_proj(_merge_heads(self._attend_cached(q, k, v, cache))[:, 0])  # (B, d_model)
        return out[:, None] if squeeze else out

    def forward_with_states(self, hidden_states: torch.Tensor, state: KVHistory | None = None, offset: int = 0
                            ) -> tuple[torch.Tensor, KVHistory]:
        """hidden_states: (B, L, d_model) at positions offset.. -> (out, the history the next
        chunk needs), attending to `state` (the earlier positions' keys and values). Nothing is
        updated in place, so a long sequence runs chunk by chunk with the exact gradient."""
        batch, length = sequence_input("Attention", hidden_states, self.d_model)
        qkv = self.in_proj(hidden_states)  # (B, L, qkv_dim)
        conv = None
        if self.d_conv > 0:
            qkv, conv = self._conv(qkv, None if state is None else state.conv)
        positions = offset + torch.arange(length, device=qkv.device)  # (L,)
        q, k, v = self._heads(qkv, positions[None])
        if state is not None and state.k.shape[2]:
            earlier = state.k.shape[2]
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)  # (B, Hkv, T + L, head_dim)
            key_positions = torch.cat([offset - earlier + torch.arange(earlier, device=qkv.device), positions])
            mask = self._visible(positions[:, None], key_positions[None, :])  # (L, T + L)
            out = self._sdpa(q, k, v, mask=mask)
        else:
            out = self._attend(q, k, v)
        keep = k.shape[2] if self.window_size is None else min(k.shape[2], self.window_size - 1)
        history = KVHistory(k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:], conv)
        return self.out_proj(_merge_heads(out)), history

    # ---- the pieces --------------------------------------------------------------------------
    def _heads(self, qkv: torch.Tensor, positions: torch.Tensor):
        """qkv (B, L, qkv_dim) at positions (B or 1, L) -> q (B, H, L, hd), k and v (B, Hkv, L, hd),
        q and k turned by the rotary embedding."""
        batch, length, _ = qkv.shape
        hd, heads, kv_heads = self.head_dim, self.num_heads, self.num_heads_kv
        q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q, k, v = (t.reshape(batch, length, -1, hd) for t in (q, k, v))  # (B, L, heads, hd)
        if self.rotary_emb_dim:
            cos, sin = self._cos_sin(positions, qkv.dtype)  # (B or 1, L, 1, rd / 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """The rotary angles' cos and sin at integer positions (..., L) -> (..., L, 1, rd / 2),
        computed in fp32 (fp64 for an fp64 model) and rounded to the activations' dtype (as
        flash-attn's and transformers' rotary embeddings round them)."""
        rd = self.rotary_emb_dim
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = 1.0 / (self.rotary_emb_base ** (torch.arange(0, rd, 2, device=positions.device, dtype=wide) / rd))
        angles = positions.to(wide)[..., None] * inv_freq  # (..., L, rd / 2)
        return (angles.cos().to(dtype).to(wide)[..., None, :], angles.sin().to(dtype).to(wide)[..., None, :])

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, L, heads, hd) with its leading rotary_emb_dim channels turned: as pairs of halves
        (GPT-NeoX, the default) or of neighbours (interleaved, GPT-J)."""
        rd = self.rotary_emb_dim
        turned = x[..., :rd].to(cos.dtype)
        if self.rotary_emb_interleaved:
            x1, x2 = turned[..., 0::2], turned[..., 1::2]
            turned = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        else:
            x1, x2 = turned[..., :rd // 2], turned[..., rd // 2:]
            turned = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return torch.cat([turned.to(x.dtype), x[..., rd:]], dim=-1)

    def _visible(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Which keys each query sees (broadcast over the positions' shapes): the earlier ones
        and itself, within the window."""
        mask = key_positions <= query_positions
        if self.window_size is not None:
            mask = mask & (key_positions > query_positions - self.window_size)
        return mask

    def _sdpa(self, q, k, v, mask=None, causal=False) -> torch.Tensor:
        """q (B, H, L, hd), k and v (B, Hkv, S, hd), mask broadcastable to (B, H, L, S) -> (B, H, L, hd)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                                              enable_gqa=self.num_heads != self.num_heads_kv)

    def _attend(self, q, k, v) -> torch.Tensor:
        """Causal attention within one chunk of positions 0..L-1 (relative), windowed if set."""
        if self.window_size is None:
            return self._sdpa(q, k, v, causal=True)
        positions = torch.arange(q.shape[2], device=q.device)
        return self._sdpa(q, k, v, mask=self._visible(positions[:, None], positions[None, :]))

    def _attend_cached(self, q, k, v, cache: AttentionState) -> torch.Tensor:
        """q (B, H, L, hd), k and v (B, Hkv, L, hd) at positions lengths + 0..L-1 of each row ->
        attention over the cache's keys and these; then these are written into the cache."""
        if q.shape[2] == 1:
            return self._attend_step(q, k, v, cache)
        lengths = cache.lengths[:, None]  # (B, 1)
        slots = cache.capacity
        used = slots if _capturing(q) else min(slots, cache.filled)
        slot = torch.arange(used, device=q.device)  # (used,)
        slot_positions = lengths - 1 - torch.remainder(lengths - 1 - slot, slots)  # (B, used): what each slot holds
        query_positions = lengths + torch.arange(q.shape[2], device=q.device)  # (B, L)
        key_positions = torch.cat([slot_positions, query_positions], dim=1)  # (B, used + L)
        held = torch.cat([slot < lengths, torch.ones_like(query_positions, dtype=torch.bool)], dim=1)
        visible = self._visible(query_positions[:, :, None], key_positions[:, None, :])  # (B, L, used + L)
        mask = held[:, None, :] & visible
        out = self._sdpa(q, torch.cat([cache.k[:, :, :used], k], dim=2), torch.cat([cache.v[:, :, :used], v], dim=2),
                         mask=mask[:, None])
        self._write(cache, k, v)
        return out

    def _attend_step(self, q, k, v, cache: AttentionState) -> torch.Tensor:
        """One query per row: k and v (B, Hkv, 1, hd) go into their slot first, then q attends over
        the cache in place (no copy of the cache, which concatenating would make at every step).
        Writing first loses nothing: with room to grow the slot is a fresh one, and in a full
        ring (a window) it held position p - T, which the window already hides from p."""
        self._write(cache, k, v)
        slots = cache.capacity
        used = slots if _capturing(q) else min(slots, cache.filled)
        position = cache.lengths[:, None] - 1  # (B, 1): the query's position, now in slot position % T
        slot = torch.arange(used, device=q.device)  # (used,)
        slot_positions = position - torch.remainder(position - slot, slots)  # (B, used): what each slot holds
        mask = (slot_positions >= 0) & self._visible(position, slot_positions)  # (B, used); < 0: never written
        return self._sdpa(q, cache.k[:, :, :used].to(q.dtype), cache.v[:, :, :used].to(q.dtype),
                          mask=mask[:, None, None, :])

    @staticmethod
    def _write(cache: AttentionState, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, Hkv, L, hd) into slots (lengths + i) % T, the last T of them when L > T (a
        ring); lengths advance by L. In place, on fixed shapes."""
        slots, length = cache.capacity, k.shape[2]
        skip = max(0, length - slots)
        if skip:
            k, v = k[:, :, skip:], v[:, :, skip:]
        where = torch.remainder(cache.lengths[:, None] + skip + torch.arange(length - skip, device=k.device), slots)
        index = where[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, Hkv, L', hd)
        cache.k.scatter_(2, index, k.to(cache.k.dtype))
        cache.v.scatter_(2, index, v.to(cache.v.dtype))
        cache.lengths.add_(length)
        cache.filled += length

    def _packed(self, qkv: torch.Tensor, cache: AttentionState | None, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """qkv (1, T, qkv_dim) of S sequences laid end to end -> the attention output (1, T, H·hd),
        each sequence attending within itself (and to its row of the cache)."""
        if self.d_conv > 0:
            qkv, final_conv = self._conv(qkv, None if cache is None else cache.conv, cu_seqlens)
            if cache is not None:
                cache.conv.copy_(final_conv)
        bounds = cu_seqlens.tolist()
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if cache is not None:
            cache.reserve(cache.filled + longest)  # before the rows' views are taken
        outs = []
        for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            part = qkv[:, start:stop]  # (1, L_s, qkv_dim)
            if cache is None:
                q, k, v = self._heads(part, torch.arange(stop - start, device=qkv.device)[None])
                outs.append(self._attend(q, k, v))
            else:
                row = cache.rows(s, s + 1)
                q, k, v = self._heads(part, row.lengths[:, None] + torch.arange(stop - start, device=qkv.device))
                outs.append(self._attend_cached(q, k, v, row))
        if cache is not None:
            cache.filled += longest
        return torch.cat([_merge_heads(o) for o in outs], dim=1)

    def _conv(self, qkv: torch.Tensor, initial: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None):
        """The causal depthwise conv over qkv (B, L, C), no activation -> (qkv (B, L, C), the last
        d_conv - 1 inputs (B or S, C, d_conv - 1)): the fused op on a plain conv's weight, else
        calls of the module (one per packed sequence)."""
        x = qkv.transpose(1, 2)  # (B, C, L)
        if is_plain(self.conv1d, nn.Conv1d):
            y, final = ops.causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, None, initial_state=initial,
                                         return_final_state=True, cu_seqlens=cu_seqlens)
        elif cu_seqlens is None:
            y, final = self._conv_by_call(x, initial)
        else:
            bounds = cu_seqlens.tolist()
            parts = [self._conv_by_call(x[:, :, a:b], None if initial is None else initial[s:s + 1])
                     for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
            y, final = torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=0)
        # (B, L, C) with the channels contiguous: SDPA's flash and memory-efficient kernels need the
        # heads' last dimension at stride 1, and fall back to the quadratic-memory math kernel without
        return y.transpose(1, 2).contiguous(), final

    def _conv_by_call(self, x: torch.Tensor, initial: torch.Tensor | None):
        """x (B, C, L) after the d_conv - 1 state inputs (zeros without), through the module ->
        (y (B, C, L), the last d_conv - 1 inputs)."""
        width = self.d_conv - 1
        state = x.new_zeros(x.shape[0], x.shape[1], width) if initial is None else initial.to(x.dtype)
        seq = torch.cat([state, x], dim=-1)  # (B, C, K-1 + L)
        y = self.conv1d(seq)[..., width:width + x.shape[-1]]  # output t sees inputs t-K+1..t
        return y, seq[..., seq.shape[-1] - width:]

    def _conv_step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        """One step of the conv: x (B, C) -> (B, C), conv_state (B, C, d_conv - 1) shifted in place."""
        if is_plain(self.conv1d, nn.Conv1d):
            return ops.causal_conv1d_update_(x, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, None)
        y, final = self._conv_by_call(x[:, :, None], conv_state)
        conv_state.copy_(final)
        return y[:, :, 0]


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on t's device (the host bounds are not kept then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, H, L, hd) -> (B, L, H·hd)."""
    return out.transpose(1, 2).flatten(2)


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()
