"""Choosing the next token from the logits: greedy (temperature 0) or temperature with top-k,
top-p and min-p, and a repetition penalty, applied in the order transformers applies them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # > 1 discourages tokens already in the context

    def check(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        for name in ("top_p", "min_p"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
                raise ValueError(f"{name} must be None or a number in (0, 1], got {v!r}")
        r = self.repetition_penalty
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                              or r <= 0):
            raise ValueError(f"repetition_penalty must be None or a finite number > 0, got {r!r}")


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


def process_logits(logits: torch.Tensor, options: SamplingOptions, seen: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) fp32 -> the logits to sample from, in the order transformers applies them:
    repetition penalty, temperature, top-k, top-p, min-p. Removed tokens get -inf."""
    if options.repetition_penalty is not None and seen is not None:
        r = options.repetition_penalty
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if options.temperature == 0:
        return logits
    logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p is not None and options.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before > options.top_p  # the most likely token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if options.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < options.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
                vocab_size: int, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits: (B, V_padded) -> token ids (B,). Padding rows of the vocabulary are never chosen."""
    logits = process_logits(logits[:, :vocab_size].float(), options, seen)
    if options.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
