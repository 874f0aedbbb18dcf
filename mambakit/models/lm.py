"""MambaLM: token embedding -> n_layer Mamba blocks -> final norm -> (tied) lm_head.

Module names follow the official checkpoints (`backbone.embedding`, `backbone.layers.{i}.mixer`,
`backbone.norm_f`, `lm_head`), so the official state dict loads without renaming. `generate`
comes from mambakit.generation's GenerationMixin, the recurrent state is its LMCache, and the
checkpoint formats are mambakit.checkpoint's. The language-model presets are registered in the
model registry (registry.py) at the end of this file.

Bad input is a TypeError / ValueError naming the argument. The checks of types, shapes, dtypes
and devices run everywhere; the ones that read tensor values (token ids in range) are all in
`MambaLM._check_values_eagerly`, which torch.compile and torch.export tracing skip: the whole
model compiles with fullgraph=True and exports (torch.export, ONNX).

The transformers conventions: `model(input_ids=ids, labels=ids)` returns a `CausalLMOutput`
(`.loss`, the shifted cross-entropy, and `.logits`), `main_input_name`, and `generate` with
transformers' options (generation/mixin.py), so that transformers' Trainer trains a MambaLM."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..checkpoint import load_pretrained, save_pretrained
from ..config import PRESETS, MambaConfig
from ..generation import GenerationMixin, LMCache, architecture_of, pack_prompts
from ..modules import (S4D, Attention, Block, GatedMLP, KVHistory, Mamba, Mamba2, MambaState, MixtureOfExperts,
                       NormedXProj)
from ..modules.norm import make_norm
from .registry import register_model

IGNORE_INDEX = -100  # a target equal to it adds no loss (cross_entropy's default ignore_index)
ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
MASK_DTYPES = ID_DTYPES + (torch.int8, torch.bool)


@dataclasses.dataclass(eq=False)
class CausalLMOutput:
    """forward's output with labels (or return_dict=True), read as transformers' CausalLMOutput:
    by attribute (out.loss), by key (out["logits"]) or as the tuple of the fields that are set
    (out[0] is the loss when there is one)."""
    loss: torch.Tensor | None = None  # a scalar
    logits: torch.Tensor | None = None  # (B, L, V)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, key) for key in self.keys())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):  # the keys, as a ModelOutput (a dict) iterates
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, L, V) against targets (B, L), in at least fp32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction=reduction)


def make_mixer(config: MambaConfig, layer_idx: int, device=None, dtype=None) -> nn.Module:
    """The mixer of layer layer_idx: causal attention at config.attn_layer_idx, else the mixer of
    config.layer: "mamba" (selective, S6) or "s4d" (LTI, S4D-Lin), gated or not, or "mamba2" (SSD)."""
    factory = {"device": device, "dtype": dtype}
    if layer_idx in config.attn_layer_idx:
        attention = config.attention
        return Attention(config.d_model, attention.num_heads, attention.num_heads_kv, attention.head_dim,
                         qkv_proj_bias=attention.qkv_proj_bias, out_proj_bias=attention.out_proj_bias,
                         softmax_scale=attention.softmax_scale, d_conv=attention.d_conv,
                         rotary_emb_dim=attention.rotary_emb_dim, rotary_emb_base=attention.rotary_emb_base,
                         rotary_emb_interleaved=attention.rotary_emb_interleaved, window_size=attention.window_size,
                         layer_idx=layer_idx, **factory)
    if config.layer == "mamba2":
        return Mamba2(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                      headdim=config.headdim, ngroups=config.ngroups, chunk_size=config.chunk_size,
                      dt_min=config.dt_min, dt_max=config.dt_max, dt_init_floor=config.dt_init_floor,
                      conv_bias=config.conv_bias, bias=config.bias, norm_eps=config.norm_epsilon,
                      layer_idx=layer_idx, **factory)
    if config.layer == "s4d":
        return S4D(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                   dt_min=config.dt_min, dt_max=config.dt_max, conv_bias=config.conv_bias, bias=config.bias,
                   gate=config.gate, layer_idx=layer_idx, **factory)
    mixer = Mamba(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                  dt_rank=config.dt_rank, dt_min=config.dt_min, dt_max=config.dt_max,
                  dt_init_floor=config.dt_init_floor, dt_scale=config.dt_scale,
                  conv_bias=config.conv_bias, bias=config.bias, layer_idx=layer_idx, gate=config.gate, **factory)
    if config.inner_norms:  # Jamba: dt, B and C normalised after x_proj
        mixer.x_proj = NormedXProj(mixer.d_inner, mixer.dt_rank, config.d_state, config.norm_epsilon, **factory)
    return mixer


def make_mlp(config: MambaConfig, layer_idx: int, device=None, dtype=None) -> nn.Module | None:
    """The MLP after the mixer of layer layer_idx: none without d_intermediate, a mixture of
    experts at config.moe_layer_idx, a gated MLP elsewhere."""
    if not config.d_intermediate:
        return None
    if layer_idx in config.moe_layer_idx:
        return MixtureOfExperts(config.d_model, config.d_intermediate, config.num_experts,
                                config.num_experts_per_tok, device=device, dtype=dtype)
    return GatedMLP(config.d_model, config.d_intermediate, device=device, dtype=dtype)


def make_block(config: MambaConfig, layer_idx: int, device=None, dtype=None) -> Block:
    """Layer layer_idx: norm + mixer, and norm2 + mlp in a hybrid with d_intermediate > 0."""
    factory = {"device": device, "dtype": dtype}
    mlp = make_mlp(config, layer_idx, **factory)
    norm2 = None if mlp is None else make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory)
    return Block(config.d_model, make_mixer(config, layer_idx, **factory),
                 make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory),
                 residual_in_fp32=config.residual_in_fp32, mlp=mlp, norm2=norm2)


def as_cu_seqlens(cu_seqlens, input_ids: torch.Tensor) -> torch.Tensor | None:
    """cu_seqlens as the ops take it. A list of int offsets is checked here (0 first, strictly
    increasing, L last) and made an int32 tensor on input_ids' device; a tensor's values are
    checked by the ops, and here only that it is on input_ids' device."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.device != input_ids.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {input_ids.device}")
        return cu_seqlens
    if not isinstance(cu_seqlens, (list, tuple)) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in cu_seqlens):
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor or a list of int offsets, got {cu_seqlens!r:.80}")
    length = input_ids.shape[-1]
    offsets = list(cu_seqlens)
    increasing = all(a < b for a, b in zip(offsets, offsets[1:]))
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != length or not increasing:
        raise ValueError(f"cu_seqlens must be offsets from 0 to L={length}, strictly increasing (no empty "
                         f"sequence), got {offsets!r:.80}")
    return torch.tensor(offsets, dtype=torch.int32, device=input_ids.device)


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **factory)
        self.layers = nn.ModuleList(make_block(config, i, **factory) for i in range(config.n_layer))
        self.norm_f = make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory)
        self.checkpoint_every = 0  # n > 0: every n-th block recomputed in the backward pass

    def _final(self, hidden, residual):
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward(self, input_ids: torch.Tensor, cache: LMCache | None = None,
                cu_seqlens: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """input_ids (B, L) -> hidden (B, L, d_model). With cu_seqlens (S + 1 offsets, a 1-D
        integer tensor or a list of ints), the batch is one row of S packed sequences."""
        cu_seqlens = as_cu_seqlens(cu_seqlens, input_ids)
        hidden, residual = self.embedding(input_ids), None  # (B, L, d_model)
        every = self.checkpoint_every if cache is None and torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            if every and i % every == 0:  # its activations recomputed in the backward pass, not stored
                hidden, residual = torch.utils.checkpoint.checkpoint(layer, hidden, residual, None, cu_seqlens,
                                                                     use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, cache=None if cache is None else cache.layers[i],
                                         cu_seqlens=cu_seqlens)
        return self._final(hidden, residual)

    def step(self, token_ids: torch.Tensor, cache: LMCache) -> torch.Tensor:
        hidden, residual = self.embedding(token_ids), None  # (B, d_model)
        for i, layer in enumerate(self.layers):
            hidden, residual = layer.step(hidden, residual, cache.layers[i])
        return self._final(hidden, residual)


class MambaLM(nn.Module, GenerationMixin):
    main_input_name = "input_ids"  # what transformers' Trainer reads the batch size from
    _keys_to_ignore_on_save = None  # (transformers' Trainer reads it when it saves)
    supports_gradient_checkpointing = True

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @classmethod
    def from_name(cls, name: str, device=None, dtype=None, **overrides) -> "MambaLM":
        """A preset of `mambakit.PRESETS` (tiny, 130m, ...) with random weights, any config field
        overridden; `mambakit.create_model(name, ...)` builds the same."""
        return cls(MambaConfig.from_name(name, **overrides), device=device, dtype=dtype)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The official init: zero linear biases (but dt_proj's), N(0, 0.02) embeddings, and
        the residual branches' last projections (out_proj, and an MLP's fc2) rescaled by
        1/sqrt(n_layer), or 1/sqrt(2 n_layer) with an MLP in every block (GPT-2's prenorm
        residual rescaling)."""
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if not self.config.rescale_prenorm_residual:
            return
        if isinstance(module, (Mamba, S4D, Attention, GatedMLP)):
            weight = (module.fc2 if isinstance(module, GatedMLP) else module.out_proj).weight
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            weight /= math.sqrt((2 if self.config.d_intermediate else 1) * self.config.n_layer)

    # ---- running -------------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor, ndim: int, name: str = "input_ids") -> None:
        """Type, dtype, shape and device of token ids; their values: _check_values_eagerly."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in ID_DTYPES:
            raise TypeError(f"{name} must be an integer tensor, got {input_ids.dtype}")
        if input_ids.ndim != ndim:
            want = "(B, L)" if ndim == 2 else "(B,)"
            raise ValueError(f"{name} must have shape {want}, got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)})")
        self._check_device(name, input_ids)

    def _check_device(self, name: str, t: torch.Tensor) -> None:
        """t on the model's device: a meta tensor (a shape without values) only for a meta model."""
        device = self.backbone.embedding.weight.device  # (a quantized lm_head's .weight is a method)
        if t.device != device:
            what = "a meta tensor (a shape without values)" if t.is_meta else f"on {t.device}"
            raise ValueError(f"{name} is {what}, but the model is on {device}")

    def _check_targets(self, targets: torch.Tensor, input_ids: torch.Tensor, name: str = "targets") -> None:
        """Type, dtype, shape and device of the training targets (or labels); their values:
        _check_values_eagerly."""
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(targets).__name__}")
        if targets.dtype not in ID_DTYPES + (torch.int8,):
            raise TypeError(f"{name} must be an integer tensor of token ids, got {targets.dtype}")
        if targets.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        self._check_device(name, targets)

    def _check_attention_mask(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Type, dtype, shape and device of forward's attention_mask; its values: _check_values_eagerly."""
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor of 0 and 1, got {type(attention_mask).__name__}")
        if attention_mask.dtype not in MASK_DTYPES:
            raise TypeError(f"attention_mask must be an integer or bool tensor of 0 and 1, got {attention_mask.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        self._check_device("attention_mask", attention_mask)

    def _check_values_eagerly(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                              targets_name: str = "targets", attention_mask: torch.Tensor | None = None) -> None:
        """Every check that reads tensor values: input ids in [0, padded_vocab_size), targets in
        [0, vocab_size) or IGNORE_INDEX, an attention_mask of 0 and 1 that pads on the right.
        Each costs a device sync, and none can run while torch.compile or torch.export traces
        the model (the value is not known then), so they are all here, skipped under tracing,
        and for meta tensors (which hold no values)."""
        if torch.compiler.is_compiling() or input_ids.is_meta:
            return
        vocab = self.config.vocab_size
        stats = list(torch.aminmax(input_ids))
        if targets is not None:
            bad_targets = ((targets < 0) | (targets >= vocab)) & (targets != IGNORE_INDEX)  # (B, L)
            stats.append(bad_targets.sum())
        if attention_mask is not None:
            mask = attention_mask.long()  # (B, L)
            stats.append(((mask != 0) & (mask != 1)).sum())
            stats.append((mask[:, 1:] > mask[:, :-1]).sum())  # a 1 after a 0: left padding or a gap
        lo, hi, *counts = torch.stack([t.long() for t in stats]).tolist()  # one sync
        if lo < 0 or hi >= self.config.padded_vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.padded_vocab_size}), got values in [{lo}, {hi}]")
        if targets is not None and counts.pop(0):
            raise ValueError(f"{targets_name} must be token ids in [0, {vocab}) or {IGNORE_INDEX} (ignored), "
                             f"got {int(targets[bad_targets][0])}")
        if attention_mask is not None:
            not_binary, left_padded = counts
            if not_binary:
                raise ValueError("attention_mask must hold only 0 and 1")
            if left_padded:
                raise ValueError("attention_mask must pad on the right (each row's ones first): the model is "
                                 "recurrent, so left padding would enter the state; generate() takes any padding")

    def _check_cache(self, cache: LMCache, batch: int, name: str = "input_ids") -> None:
        """A cache of this model's layer count at this batch (check_fits checks everything)."""
        if not isinstance(cache, LMCache):
            raise TypeError(f"cache must be an LMCache, got {type(cache).__name__}")
        if len(cache.layers) != len(self.backbone.layers):
            raise ValueError(f"the cache holds {len(cache.layers)} layers, the model has {len(self.backbone.layers)}")
        if cache.batch_size != batch:
            raise ValueError(f"cache holds batch {cache.batch_size} but {name} has batch {batch}")

    def forward(self, input_ids: torch.Tensor, cache: LMCache | None = None, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, chunk_len: int | None = None, *,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                return_dict: bool | None = None) -> torch.Tensor | CausalLMOutput | tuple[torch.Tensor, ...]:
        """input_ids: (B, L) -> logits (B, L, V), or (B, logits_to_keep, V) for the last positions
        only. With a cache, continue from its state and leave the final state in it.
        With targets (B, L) (token ids, or IGNORE_INDEX where no loss is wanted), the mean
        cross-entropy instead (in at least fp32), run chunk_len tokens at a time when chunk_len
        is given (see chunked_loss). Training goes through forward so that wrappers such as
        DistributedDataParallel see it.

        transformers' conventions: with labels (B, L), a CausalLMOutput of the loss of its causal
        LMs (logits[:, :-1] against labels[:, 1:], IGNORE_INDEX ignored, the mean in at least
        fp32) and the logits; return_dict=True gives a CausalLMOutput without labels too, and
        return_dict=False the tuple (loss, logits) with them. An attention_mask (B, L) may pad
        on the right only: the model is causal, so that changes no real position's logits (give
        the padding IGNORE_INDEX labels to leave it out of the loss)."""
        self._check_ids(input_ids, 2)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"logits_to_keep must be an int, got {type(logits_to_keep).__name__}")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}")
        if return_dict is not None and not isinstance(return_dict, bool):
            raise TypeError(f"return_dict must be None, True or False, got {return_dict!r:.80}")
        if attention_mask is not None:
            if cache is not None or targets is not None:
                raise ValueError("attention_mask goes with labels or the logits, without a cache or targets: "
                                 "padding would enter the cache's state (generate() and prefill() take padded "
                                 "prompts); with targets, give the padding IGNORE_INDEX targets")
            self._check_attention_mask(attention_mask, input_ids)
        if labels is not None:
            if targets is not None or cache is not None or logits_to_keep or chunk_len is not None:
                raise ValueError("labels= computes transformers' training loss (shifted inside); it takes no "
                                 "targets (already shifted), cache, logits_to_keep or chunk_len")
            return self._labels_loss(input_ids, labels, attention_mask, return_dict)
        if targets is not None:
            if cache is not None or logits_to_keep:
                raise ValueError("targets= computes the training loss; it takes no cache or logits_to_keep")
            if return_dict is not None:
                raise ValueError("targets= returns the loss alone, without return_dict "
                                 "(labels= gives a CausalLMOutput)")
            if chunk_len is not None:
                _check_chunk_len(chunk_len)
                if chunk_len < input_ids.shape[1]:
                    return self.chunked_loss(input_ids, targets, chunk_len)
            self._check_targets(targets, input_ids)
            self._check_values_eagerly(input_ids, targets)
            return lm_loss(self._logits(input_ids), targets)
        self._check_values_eagerly(input_ids, attention_mask=attention_mask)
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        logits = self._logits(input_ids, cache, logits_to_keep)
        return CausalLMOutput(logits=logits) if return_dict else logits

    def _labels_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                     return_dict: bool | None) -> CausalLMOutput | tuple[torch.Tensor, torch.Tensor]:
        """forward with labels: transformers' causal-LM loss and the logits (B, L, V)."""
        self._check_targets(labels, input_ids, "labels")
        self._check_values_eagerly(input_ids, labels, "labels", attention_mask)
        logits = self._logits(input_ids)  # (B, L, V)
        # position t predicts labels[t + 1]; the last position predicts nothing (as transformers'
        # ForCausalLMLoss: the labels shifted left, IGNORE_INDEX at the end, no copy of the logits)
        next_labels = torch.nn.functional.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX)  # (B, L)
        loss = lm_loss(logits, next_labels)
        return (loss, logits) if return_dict is False else CausalLMOutput(loss=loss, logits=logits)

    def _logits(self, input_ids: torch.Tensor, cache: LMCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """forward's computation on checked arguments: (B, L) -> (B, L or logits_to_keep, V)."""
        hidden = self.backbone(input_ids.long(), cache)  # (B, L, d_model)
        if logits_to_keep:  # contiguous: a quantized head's kernel (torchao int4) takes no strided input
            hidden = hidden[:, -logits_to_keep:].contiguous()  # (B, logits_to_keep, d_model)
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        return self.lm_head(hidden)

    def step(self, token_ids: torch.Tensor, cache: LMCache) -> torch.Tensor:
        """token_ids: (B,) -> logits (B, V); one token, updating the cache."""
        self._check_ids(token_ids, 1)
        self._check_values_eagerly(token_ids)
        self._check_cache(cache, token_ids.shape[0], "token_ids")
        cache.reserve(cache.seqlen + 1)  # an attention layer's KV cache has room for this token
        logits = self.lm_head(self.backbone.step(token_ids.long(), cache))
        cache.seqlen += 1
        cache.last_logits = logits
        return logits

    def chunked_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, chunk_len: int,
                     checkpoint: bool = True) -> torch.Tensor:
        """The mean cross-entropy over a long sequence, run chunk_len tokens at a time. Every
        layer's conv and SSM states carry from chunk to chunk with their gradients, and every
        attention layer's keys and values (all of the earlier ones, or the window's), so this is
        the full sequence's loss and gradient, not truncated backprop. With checkpoint, each
        chunk's activations are recomputed in the backward pass, so that only the chunk
        boundaries' states stay in memory: memory stays flat as the length grows, but for the
        attention layers' keys and values, which grow with it (a window bounds them).
        input_ids, targets: (B, L) -> a scalar."""
        from torch.utils.checkpoint import checkpoint as recompute
        self._check_ids(input_ids, 2)
        self._check_targets(targets, input_ids)
        _check_chunk_len(chunk_len)
        self._check_values_eagerly(input_ids, targets)
        layers = self.backbone.layers

        def run_chunk(ids, tgt, offset, *flat_states):
            states = _unflatten_states(layers, flat_states)
            hidden, residual, finals = self.backbone.embedding(ids), None, []
            for layer, state in zip(layers, states):
                hidden, residual, final = layer.forward_with_states(hidden, residual, state, offset)
                finals.append(final)
            loss_sum = lm_loss(self.lm_head(self.backbone._final(hidden, residual)), tgt, reduction="sum")
            return (loss_sum, *_flatten_states(finals))

        flat = [None] * sum(_STATE_TENSORS[isinstance(layer.mixer, Attention)] for layer in layers)
        total = None
        for start in range(0, input_ids.shape[1], chunk_len):
            ids, tgt = input_ids[:, start:start + chunk_len].long(), targets[:, start:start + chunk_len].long()
            if checkpoint and torch.is_grad_enabled():
                out = recompute(run_chunk, ids, tgt, start, *flat, use_reentrant=False)
            else:
                out = run_chunk(ids, tgt, start, *flat)
            total = out[0] if total is None else total + out[0]
            flat = list(out[1:])
        return total / (targets != IGNORE_INDEX).sum()  # the mean over the targets not ignored, as lm_loss

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute every every_n_layers-th block's activations in the backward pass instead of
        storing them, as transformers' models do (its Trainer calls this, or the older
        gradient_checkpointing_enable, with gradient_checkpointing=True). The checkpoint is
        torch's non-reentrant one; offloading to the host is not supported."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) or kwargs:
            raise ValueError(f"activation checkpointing takes only use_reentrant=False, "
                             f"got {activation_checkpointing_kwargs!r:.80}")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be an int >= 1, got {every_n_layers!r:.80}")
        if offload:
            raise ValueError("offload=True is not supported: the recomputed blocks' inputs stay on the device")
        self.backbone.checkpoint_every = every_n_layers

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' older name of activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.backbone.checkpoint_every = 0

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.backbone.checkpoint_every > 0

    def allocate_cache(self, batch_size: int, device=None, dtype=None, max_seqlen: int | None = None) -> LMCache:
        """An empty cache: every Mamba layer's constant-size state, and every attention layer's KV
        cache with room for max_seqlen positions per row (it grows when a prompt needs more;
        generate reserves the prompt's and the new tokens' before decoding)."""
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                       or max_seqlen < 0):
            raise ValueError(f"max_seqlen must be None or an int >= 0, got {max_seqlen!r:.80}")
        states = []
        for layer in self.backbone.layers:
            if isinstance(layer.mixer, Attention):
                states.append(layer.mixer.allocate_state(batch_size, device, dtype, max_seqlen=max_seqlen or 0))
            else:
                states.append(layer.mixer.allocate_state(batch_size, device, dtype))
        return LMCache(states, architecture=architecture_of(self.config))

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask: torch.Tensor | None = None, cache: LMCache | None = None,
                max_seqlen: int | None = None) -> tuple[torch.Tensor, LMCache]:
        """Runs prompts through the parallel scan, with no per-token loop. Returns (the logits
        for the next token (B, V), the cache), and keeps those logits in the cache.

        input_ids: a (B, L) tensor, optionally with an attention_mask (left or right padding),
        or a list of prompts of different lengths. Prompts of different lengths are packed into
        one row with cu_seqlens, so padding never enters the state (nor an attention layer's
        keys: each prompt attends within itself). With a cache, the prompt (a (B, L) tensor)
        continues from the cache's state: a conversation's next turn. max_seqlen: the positions
        a new cache's attention layers make room for (the prompt's at least)."""
        if cache is not None:
            if not isinstance(input_ids, torch.Tensor) or attention_mask is not None:
                raise ValueError("continuing a cache takes a (B, L) tensor of new tokens, without attention_mask")
            if not isinstance(cache, LMCache):
                raise TypeError(f"cache must be an LMCache, got {type(cache).__name__}")
            cache.check_fits(self)
            logits = self(input_ids, cache=cache, logits_to_keep=1)[:, -1]
            cache.last_logits = logits
            return logits, cache
        if isinstance(input_ids, torch.Tensor) and attention_mask is None:
            self._check_ids(input_ids, 2)
            cache = self.allocate_cache(input_ids.shape[0], max_seqlen=max(max_seqlen or 0, input_ids.shape[1]))
            logits = self(input_ids, cache=cache, logits_to_keep=1)[:, -1]
        else:
            packed = pack_prompts(input_ids, attention_mask, device=self.backbone.embedding.weight.device)
            self._check_ids(packed.ids, 2)
            self._check_values_eagerly(packed.ids)
            cache = self.allocate_cache(len(packed.prompts), max_seqlen=max(max_seqlen or 0, max(packed.lengths)))
            hidden = self.backbone(packed.ids, cache, cu_seqlens=packed.cu_seqlens)  # (1, T, d_model)
            logits = self.lm_head(hidden[0, packed.last_positions])  # (S, V)
            cache.seqlen = max(packed.lengths)
        cache.last_logits = logits
        return logits, cache

    # ---- checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device=None, dtype=None) -> "MambaLM":
        """A checkpoint directory (mambakit, Hugging Face or official format) or a hub id in the
        local Hugging Face cache; nothing is downloaded."""
        return load_pretrained(cls, name_or_path, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path, format: str = "mambakit",
                        max_shard_size: int | str | None = None) -> None:
        """Writes the model in the mambakit, "hf" (Hugging Face) or "official" (mamba_ssm) format;
        max_shard_size ("5GB" by default) shards the safetensors formats."""
        save_pretrained(self, directory, format=format, max_shard_size=max_shard_size)


# the tensors a layer's state is carried as between chunks: (conv, ssm) for a Mamba mixer's
# MambaState, (k, v, conv) for an attention mixer's KVHistory
_STATE_TENSORS = {False: 2, True: 3}


def _flatten_states(states: list) -> list:
    flat = []
    for state in states:
        flat += [state.k, state.v, state.conv] if isinstance(state, KVHistory) else [state.conv, state.ssm]
    return flat


def _unflatten_states(layers, flat: tuple) -> list:
    """The states of _flatten_states back, None for the first chunk's (all None)."""
    states, at = [], 0
    for layer in layers:
        attention = isinstance(layer.mixer, Attention)
        parts = flat[at:at + _STATE_TENSORS[attention]]
        at += len(parts)
        if parts[0] is None:
            states.append(None)
        else:
            states.append(KVHistory(*parts) if attention else MambaState(*parts))
    return states


def _check_chunk_len(chunk_len) -> None:
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")


# ---- the registry's language models ----------------------------------------------------------

# the small LM of the Mamba paper's synthetic tasks (tasks/synthetic.py: selective copying,
# induction heads): 16 tokens, RMSNorm, tied embeddings; a task overrides the mixer (layer, gate)
# and the sizes from its flags
SYNTHETIC_TASKS = MambaConfig(d_model=64, n_layer=2, vocab_size=16, d_state=16)


def lm_builder(config: MambaConfig) -> Callable[..., MambaLM]:
    """The registry's builder of a MambaLM preset: (device=None, dtype=None, **config overrides) -> MambaLM."""
    def build(device=None, dtype=None, **overrides) -> MambaLM:
        return MambaLM(dataclasses.replace(config, **overrides), device=device, dtype=dtype)
    return build


for _name in PRESETS:
    register_model(_name, functools.partial(MambaLM.from_name, _name))
register_model("mamba_synthetic", lm_builder(SYNTHETIC_TASKS))
