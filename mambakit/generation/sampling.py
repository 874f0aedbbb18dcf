"""Choosing the next token from the logits: greedy (temperature 0) or temperature with top-k,
top-p and min-p, and a repetition penalty, applied in the order transformers applies them.

A temperature below MIN_TEMPERATURE (1e-5, vLLM's threshold) is greedy: that is the limit of
sampling as the temperature goes to 0, and dividing the logits by a tinier one overflows them
to inf (1e-45 turns every logit into +-inf and the softmax into nan)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingOptions:
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE): greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # > 1 discourages tokens already in the context

    def check(self) -> None:
        t = self.temperature
        if not _finite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {short_repr(t)}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {short_repr(k)}")
        for name in ("top_p", "min_p"):
            v = getattr(self, name)
            if v is not None and (not _finite(v) or not 0 < v <= 1):
                raise ValueError(f"{name} must be None or a number in (0, 1], got {short_repr(v)}")
        r = self.repetition_penalty
        if r is not None and (not _finite(r) or r <= 0):
            raise ValueError(f"repetition_penalty must be None or a finite number > 0, got {short_repr(r)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _finite(v) -> bool:
    """A real number (not a bool) that is finite as a float (an int beyond the float range is not)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def short_repr(v) -> str:
    """v for a message, short (an int of 5000 digits has no repr)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an int of {v.bit_length()} bits"
    return repr(v)[:80]


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {short_repr(max_new_tokens)}")


def check_seed(seed) -> None:
    """None, or an int that torch.Generator.manual_seed takes (64 bits)."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or an int, got {type(seed).__name__} {short_repr(seed)}")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"seed must fit in 64 bits ([-2**63, 2**64)), got {short_repr(seed)}")


def process_logits(logits: torch.Tensor, options: SamplingOptions, seen: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) fp32 -> the logits to sample from, in the order transformers applies them:
    repetition penalty, temperature, top-k, top-p, min-p. Removed tokens get -inf."""
    if options.repetition_penalty is not None and seen is not None:
        r = options.repetition_penalty
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    if options.greedy:
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
    if options.greedy:
        return logits.argmax(-1)
    return _draw(logits, generator)


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of softmax(logits) (B, V) -> (B,). A row whose logits overflowed (+inf
    after an extreme repetition penalty, or all -inf) has no distribution: it takes its argmax,
    the limit as the scale grows, instead of failing. No host sync."""
    probs = torch.softmax(logits, dim=-1)
    valid = torch.isfinite(probs).all(dim=-1, keepdim=True)  # (B, 1)
    drawn = torch.multinomial(torch.where(valid, probs, 1.0), 1, generator=generator)[:, 0]
    return torch.where(valid[:, 0], drawn, logits.argmax(-1))
