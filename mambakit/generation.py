"""Autoregressive generation: a parallel prefill of the prompts, then one constant-cost step()
per new token.

Prompts of different lengths (a list, or a padded tensor with an attention mask) are prefilled
packed, so each gives exactly what it gives alone. Sampling: greedy (temperature 0) or
temperature with top-k, top-p and min-p, and a repetition penalty. Generation stops per row at
eos_token_id or at a stop string (with a tokenizer). `stream` yields the tokens as they are
made; `generate` collects them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

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


def _check_max_new_tokens(max_new_tokens) -> None:
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


class _StopStrings:
    """Per-row stop strings, checked on the decoded text of each row's new tokens."""

    def __init__(self, stop, tokenizer, batch: int):
        if isinstance(stop, str):
            stop = [stop]
        if not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer= to decode the generated tokens")
        self.stop, self.tokenizer = list(stop), tokenizer
        self.new: list[list[int]] = [[] for _ in range(batch)]

    def hit(self, tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        hits = torch.zeros_like(done)
        for i, tok in enumerate(tokens.tolist()):
            if done[i]:
                continue
            self.new[i].append(tok)
            text = self.tokenizer.decode(self.new[i])
            hits[i] = any(s in text for s in self.stop)
        return hits


@torch.no_grad()
def stream(model, input_ids: torch.Tensor | Sequence | None = None, max_new_tokens: int = 64, *,
           attention_mask: torch.Tensor | None = None, cache=None, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repetition_penalty: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
           pad_token_id: int | None = None, stop: str | Sequence[str] | None = None, tokenizer=None,
           cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token ids (B,) one step at a time. Rows that have finished (eos or a stop
    string) yield pad_token_id (eos_token_id when not given, else 0) until all have finished.

    Start from input_ids (a (B, L) tensor, optionally with attention_mask, or a list of prompts
    of different lengths), from a cache that prefill() or an earlier generation left (its last
    logits give the next token), or from a cache and new input_ids that continue it. A cache
    passed in takes in every token yielded (one more step at the end), so that it can be saved
    and continued; a generator closed early leaves it after the last token it fed."""
    _check_max_new_tokens(max_new_tokens)
    options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty)
    options.check()
    if input_ids is None and cache is None:
        raise ValueError("generation needs input_ids, a cache, or both")
    keep_cache_current = cache is not None  # the caller's cache: it takes in every token yielded
    if cache is not None and input_ids is None:
        if cache.last_logits is None:
            raise ValueError("this cache holds no next-token logits; pass the next input_ids with it")
        logits = cache.last_logits
    else:
        logits, cache = model.prefill(input_ids, attention_mask=attention_mask, cache=cache)
    batch, device = logits.shape[0], logits.device
    vocab = model.config.vocab_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    seen = None
    if repetition_penalty is not None:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        if input_ids is not None:
            from .prompts import pack_prompts
            for i, p in enumerate(pack_prompts(input_ids, attention_mask, device=device).prompts):
                seen[i, p[p < vocab]] = True
    stops = _StopStrings(stop, tokenizer, batch) if stop is not None else None
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {device}")
    runner = None
    if (cuda_graph is None and device.type == "cuda") or cuda_graph:
        from .graphs import graphed_decoder
        runner = graphed_decoder(model, batch, device)
        runner.load(cache)
    elif device.type == "cpu":
        from .cpu_decode import cpu_decoder
        runner = cpu_decoder(model, batch)  # None where the plan does not apply: model.step then
        if runner is not None:
            runner.load(cache)
    try:
        yield from _decode(model, cache, runner, logits, max_new_tokens, options, generator, vocab, seen, stops,
                           pad, eos_token_id, done, keep_cache_current)
    finally:
        if runner is not None:  # the caller's cache gets the state back, and its own logits
            runner.store(cache)
            if cache.last_logits is runner.logits:
                cache.last_logits = runner.logits.clone()


def _decode(model, cache, runner, logits, max_new_tokens, options, generator, vocab, seen, stops, pad,
            eos_token_id, done, keep_cache_current):
    batch, device = logits.shape[0], logits.device
    can_finish = eos_token_id is not None or stops is not None  # else no per-step host sync
    for i in range(max_new_tokens):
        token = sample_next(logits, options, generator, vocab, seen)
        if can_finish:
            token = torch.where(done, torch.full_like(token, pad), token)
            finished = torch.zeros_like(done)
            if eos_token_id is not None:
                finished |= token == eos_token_id
            if stops is not None:
                finished |= stops.hit(token, done)
        if seen is not None:
            seen[torch.arange(batch, device=device)[~done], token[~done]] = True
        if can_finish:
            done |= finished
        yield token
        last = i + 1 == max_new_tokens or (can_finish and bool(done.all()))
        if last and not keep_cache_current:
            return
        if runner is None:
            logits = model.step(token, cache)
        else:
            logits = runner(token)
            cache.seqlen += 1
            cache.last_logits = logits
        if last:
            return


def generate(model, input_ids: torch.Tensor | Sequence | None = None, max_new_tokens: int = 64, *,
             stream: bool = False, **options):
    """The prompt followed by the new tokens. For a (B, L) tensor (with or without
    attention_mask) a (B, L + new) tensor, finished rows padded; for a list of prompts a list
    of 1-D tensors, each ending where it finished. With stream=True, the iterator of `stream`."""
    tokens = _stream(model, input_ids, max_new_tokens, **options)
    if stream:
        return tokens
    new = list(tokens)
    if input_ids is None:
        return torch.stack(new, dim=1) if new else None
    if isinstance(input_ids, torch.Tensor):
        if not new:
            return input_ids
        return torch.cat([input_ids, torch.stack(new, dim=1).to(input_ids.device, input_ids.dtype)], dim=1)
    out = []
    eos, stop = options.get("eos_token_id"), options.get("stop")
    for i, prompt in enumerate(input_ids):
        row = [int(t[i]) for t in new]
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        if stop is not None:
            row = _cut_at_stop(row, stop, options.get("tokenizer"))
        out.append(torch.cat([torch.as_tensor(prompt, dtype=torch.long).cpu(), torch.tensor(row, dtype=torch.long)]))
    return out


_stream = stream  # generate's keyword argument `stream` shadows the function


def _cut_at_stop(row: list[int], stop, tokenizer) -> list[int]:
    stop = [stop] if isinstance(stop, str) else list(stop)
    for n in range(1, len(row) + 1):
        if any(s in tokenizer.decode(row[:n]) for s in stop):
            return row[:n]
    return row
