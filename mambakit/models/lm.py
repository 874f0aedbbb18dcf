"""MambaLM: token embedding -> n_layer Mamba blocks -> final norm -> (tied) lm_head.

Module names follow the official checkpoints (`backbone.embedding`, `backbone.layers.{i}.mixer`,
`backbone.norm_f`, `lm_head`), so the official state dict loads without renaming. `generate`
comes from mambakit.generation's GenerationMixin, the recurrent state is its LMCache, and the
checkpoint formats are mambakit.checkpoint's. The language-model presets are registered in the
model registry (registry.py) at the end of this file."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import load_pretrained, save_pretrained
from ..config import PRESETS, MambaConfig
from ..generation import GenerationMixin, LMCache, pack_prompts
from ..modules import S4D, Block, Mamba, MambaState
from ..modules.norm import make_norm
from .registry import register_model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, L, V) against targets (B, L), in at least fp32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), reduction=reduction)


def make_mixer(config: MambaConfig, layer_idx: int, device=None, dtype=None) -> nn.Module:
    """The mixer of config.layer: "mamba" (selective, S6) or "s4d" (LTI, S4D-Lin), gated or not."""
    factory = {"device": device, "dtype": dtype}
    if config.layer == "s4d":
        return S4D(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                   dt_min=config.dt_min, dt_max=config.dt_max, conv_bias=config.conv_bias, bias=config.bias,
                   gate=config.gate, layer_idx=layer_idx, **factory)
    return Mamba(config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                 dt_rank=config.dt_rank, dt_min=config.dt_min, dt_max=config.dt_max,
                 dt_init_floor=config.dt_init_floor, dt_scale=config.dt_scale,
                 conv_bias=config.conv_bias, bias=config.bias, layer_idx=layer_idx, gate=config.gate, **factory)


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **factory)
        self.layers = nn.ModuleList(
            Block(config.d_model, make_mixer(config, i, **factory),
                  make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory),
                  residual_in_fp32=config.residual_in_fp32)
            for i in range(config.n_layer))
        self.norm_f = make_norm(config.d_model, config.rms_norm, config.norm_epsilon, **factory)

    def _final(self, hidden, residual):
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward(self, input_ids: torch.Tensor, cache: LMCache | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        hidden, residual = self.embedding(input_ids), None  # (B, L, d_model)
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cache=None if cache is None else cache.layers[i],
                                     cu_seqlens=cu_seqlens)
        return self._final(hidden, residual)

    def step(self, token_ids: torch.Tensor, cache: LMCache) -> torch.Tensor:
        hidden, residual = self.embedding(token_ids), None  # (B, d_model)
        for i, layer in enumerate(self.layers):
            hidden, residual = layer.step(hidden, residual, cache.layers[i])
        return self._final(hidden, residual)


class MambaLM(nn.Module, GenerationMixin):
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
        out_proj rescaled by 1/sqrt(n_layer) (GPT-2's prenorm residual rescaling)."""
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, (Mamba, S4D)) and self.config.rescale_prenorm_residual:
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            module.out_proj.weight /= math.sqrt(self.config.n_layer)

    # ---- running -------------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor, ndim: int) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.ndim != ndim:
            want = "(B, L)" if ndim == 2 else "(B,)"
            raise ValueError(f"input_ids must have shape {want}, got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.padded_vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.padded_vocab_size}), got values in [{lo}, {hi}]")

    def forward(self, input_ids: torch.Tensor, cache: LMCache | None = None, logits_to_keep: int = 0,
                targets: torch.Tensor | None = None, chunk_len: int | None = None) -> torch.Tensor:
        """input_ids: (B, L) -> logits (B, L, V), or (B, logits_to_keep, V) for the last positions
        only. With a cache, continue from its state and leave the final state in it.
        With targets (B, L), the mean cross-entropy instead (in at least fp32), run chunk_len
        tokens at a time when chunk_len is given (see chunked_loss). Training goes through
        forward so that wrappers such as DistributedDataParallel see it."""
        if targets is not None:
            if cache is not None or logits_to_keep:
                raise ValueError("targets= computes the training loss; it takes no cache or logits_to_keep")
            if chunk_len is not None and chunk_len < input_ids.shape[1]:
                return self.chunked_loss(input_ids, targets, chunk_len)
            return lm_loss(self(input_ids), targets)
        self._check_ids(input_ids, 2)
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"cache holds batch {cache.batch_size} but input_ids has batch {input_ids.shape[0]}")
        hidden = self.backbone(input_ids.long(), cache)  # (B, L, d_model)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        return self.lm_head(hidden)

    def step(self, token_ids: torch.Tensor, cache: LMCache) -> torch.Tensor:
        """token_ids: (B,) -> logits (B, V); one token, updating the cache."""
        self._check_ids(token_ids, 1)
        if cache.batch_size != token_ids.shape[0]:
            raise ValueError(f"cache holds batch {cache.batch_size} but token_ids has batch {token_ids.shape[0]}")
        logits = self.lm_head(self.backbone.step(token_ids.long(), cache))
        cache.seqlen += 1
        cache.last_logits = logits
        return logits

    def chunked_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, chunk_len: int,
                     checkpoint: bool = True) -> torch.Tensor:
        """The mean cross-entropy over a long sequence, run chunk_len tokens at a time. Every
        layer's conv and SSM states carry from chunk to chunk with their gradients, so this is
        the full sequence's loss and gradient, not truncated backprop. With checkpoint, each
        chunk's activations are recomputed in the backward pass, so that only the chunk
        boundaries' states stay in memory: memory stays flat as the length grows.
        input_ids, targets: (B, L) -> a scalar."""
        from torch.utils.checkpoint import checkpoint as recompute
        self._check_ids(input_ids, 2)
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
            raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
        n_layer = len(self.backbone.layers)

        def run_chunk(ids, tgt, *flat_states):
            states = [None if flat_states[2 * i] is None else MambaState(flat_states[2 * i], flat_states[2 * i + 1])
                      for i in range(n_layer)]
            hidden, residual, finals = self.backbone.embedding(ids), None, []
            for layer, state in zip(self.backbone.layers, states):
                hidden, residual, final = layer.forward_with_states(hidden, residual, state)
                finals.append(final)
            loss_sum = lm_loss(self.lm_head(self.backbone._final(hidden, residual)), tgt, reduction="sum")
            return (loss_sum, *[t for f in finals for t in (f.conv, f.ssm)])

        flat = [None] * (2 * n_layer)
        total = None
        for start in range(0, input_ids.shape[1], chunk_len):
            ids, tgt = input_ids[:, start:start + chunk_len].long(), targets[:, start:start + chunk_len].long()
            if checkpoint and torch.is_grad_enabled():
                out = recompute(run_chunk, ids, tgt, *flat, use_reentrant=False)
            else:
                out = run_chunk(ids, tgt, *flat)
            total = out[0] if total is None else total + out[0]
            flat = list(out[1:])
        return total / targets.numel()

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> LMCache:
        return LMCache([layer.mixer.allocate_state(batch_size, device, dtype) for layer in self.backbone.layers])

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask: torch.Tensor | None = None, cache: LMCache | None = None
                ) -> tuple[torch.Tensor, LMCache]:
        """Runs prompts through the parallel scan, with no per-token loop. Returns (the logits
        for the next token (B, V), the cache), and keeps those logits in the cache.

        input_ids: a (B, L) tensor, optionally with an attention_mask (left or right padding),
        or a list of prompts of different lengths. Prompts of different lengths are packed into
        one row with cu_seqlens, so padding never enters the state. With a cache, the prompt
        (a (B, L) tensor) continues from the cache's state: a conversation's next turn."""
        if cache is not None:
            if not isinstance(input_ids, torch.Tensor) or attention_mask is not None:
                raise ValueError("continuing a cache takes a (B, L) tensor of new tokens, without attention_mask")
            logits = self(input_ids, cache=cache, logits_to_keep=1)[:, -1]
            cache.last_logits = logits
            return logits, cache
        if isinstance(input_ids, torch.Tensor) and attention_mask is None:
            cache = self.allocate_cache(input_ids.shape[0])
            logits = self(input_ids, cache=cache, logits_to_keep=1)[:, -1]
        else:
            packed = pack_prompts(input_ids, attention_mask, device=self.lm_head.weight.device)
            self._check_ids(packed.ids, 2)
            cache = self.allocate_cache(len(packed.prompts))
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

    def save_pretrained(self, directory: str | Path, format: str = "mambakit") -> None:
        """Writes the model in the mambakit, "hf" (Hugging Face) or "official" (mamba_ssm) format."""
        save_pretrained(self, directory, format=format)


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
