"""Autoregressive generation: a parallel prefill of the prompt, then one constant-cost step()
per new token. Greedy (temperature 0) or sampled with temperature / top-k."""

from __future__ import annotations

import math
from typing import Iterator

import torch


def _check_options(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, vocab_size: int) -> torch.Tensor:
    """logits: (B, V_padded) -> token ids (B,). Padding rows of the vocabulary are never chosen."""
    logits = logits[:, :vocab_size].float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
           top_k: int | None = None, seed: int | None = None, eos_token_id: int | None = None
           ) -> Iterator[torch.Tensor]:
    """Yields the next token ids (B,) one step at a time."""
    _check_options(max_new_tokens, temperature, top_k)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed)
    logits, cache = model.prefill(input_ids)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator, model.config.vocab_size)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        yield token
        if i + 1 == max_new_tokens or bool(done.all()):
            return
        logits = model.step(token, cache)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 64, **options) -> torch.Tensor:
    """input_ids: (B, L) -> (B, L + new) with the prompt first."""
    new = list(stream(model, input_ids, max_new_tokens, **options))
    return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.dtype)], dim=1) if new else input_ids
