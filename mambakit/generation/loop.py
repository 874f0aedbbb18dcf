"""Autoregressive generation: a parallel prefill of the prompts, then one constant-cost step()
per new token.

Prompts of different lengths (a list, or a padded tensor with an attention mask) are prefilled
packed, so each gives exactly what it gives alone. Sampling: greedy (temperature 0) or
temperature with top-k, top-p and min-p, and a repetition penalty (sampling.py). Generation
stops per row at eos_token_id or at a stop string (with a tokenizer; stopping.py). `stream`
yields the tokens as they are made; `generate` collects them.

The model is duck-typed: it has `config.vocab_size`, `prefill(input_ids, attention_mask=,
cache=)` and `step(token_ids, cache)`; on CUDA and CPU a faster decoder replaces `step` where it
applies (cuda_graph.py, cpu_decode.py)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .cache import LMCache
from .cpu_decode import cpu_decoder
from .cuda_graph import graphed_decoder
from .prompts import pack_prompts
from .sampling import SamplingOptions, check_max_new_tokens, check_seed, sample_next, short_repr
from .stopping import StopStrings, cut_at_stop


@torch.no_grad()
def stream(model, input_ids: torch.Tensor | Sequence | None = None, max_new_tokens: int = 64, *,
           attention_mask: torch.Tensor | None = None, cache=None, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           repetition_penalty: float | None = None, seed: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
           stop: str | Sequence[str] | None = None, tokenizer=None,
           cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token ids (B,) one step at a time. Rows that have finished (eos_token_id,
    an id or a list of them, or a stop string) yield pad_token_id (the first eos_token_id when
    not given, else 0) until all have finished.

    Start from input_ids (a (B, L) tensor, optionally with attention_mask, or a list of prompts
    of different lengths), from a cache that prefill() or an earlier generation left (its last
    logits give the next token), or from a cache and new input_ids that continue it. A cache
    passed in takes in every token yielded (one more step at the end), so that it can be saved
    and continued; a generator closed early leaves it after the last token it fed.

    Every argument is checked before the first token: a bad one is a ValueError or TypeError
    naming it, and a cache made for another model is refused, saying what differs."""
    check_max_new_tokens(max_new_tokens)
    options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty)
    options.check()
    check_seed(seed)
    eos_ids = eos_token_ids(eos_token_id, model.config.vocab_size)
    check_token_id("pad_token_id", pad_token_id, model.config.vocab_size)
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
    if input_ids is None and cache is None:
        raise ValueError("generation needs input_ids, a cache, or both")
    if cache is not None:
        if not isinstance(cache, LMCache):
            raise TypeError(f"cache must be an LMCache, got {type(cache).__name__}")
        cache.check_fits(model)
    keep_cache_current = cache is not None  # the caller's cache: it takes in every token yielded
    if cache is not None and input_ids is None:
        if cache.last_logits is None:
            raise ValueError("this cache holds no next-token logits; pass the next input_ids with it")
        logits = cache.last_logits
    else:
        logits, cache = model.prefill(input_ids, attention_mask=attention_mask, cache=cache)
    cache.reserve(cache.seqlen + max_new_tokens)  # attention layers' KV caches: decoding runs on fixed buffers
    batch, device = logits.shape[0], logits.device
    vocab = model.config.vocab_size
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    seen = None
    if repetition_penalty is not None:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        if input_ids is not None:
            for i, p in enumerate(pack_prompts(input_ids, attention_mask, device=device).prompts):
                seen[i, p[p < vocab]] = True
    stops = StopStrings(stop, tokenizer, batch) if stop is not None else None
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {device}")
    runner = None
    if (cuda_graph is None and device.type == "cuda") or cuda_graph:
        runner = graphed_decoder(model, batch, device, cache)
        runner.load(cache)
    elif device.type == "cpu" and not getattr(model.config, "is_hybrid", False):
        # (the planned CPU step covers Mamba blocks only; a hybrid's attention and MLPs step through model.step)
        runner = cpu_decoder(model, batch)  # None where the plan does not apply: model.step then
        if runner is not None:
            runner.load(cache)
    try:
        yield from _decode(model, cache, runner, logits, max_new_tokens, options, generator, vocab, seen, stops,
                           pad, eos_ids, done, keep_cache_current)
    finally:
        if runner is not None:  # the caller's cache gets the state back, and its own logits
            runner.store(cache)
            if cache.last_logits is runner.logits:
                cache.last_logits = runner.logits.clone()


def check_token_id(name: str, value, vocab_size: int) -> None:
    """None, or a token id in [0, vocab_size): one that generation can yield."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or an int token id, got {type(value).__name__} {short_repr(value)}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {short_repr(value)}")


def eos_token_ids(eos_token_id, vocab_size: int) -> tuple[int, ...]:
    """eos_token_id (None, an id, or a list of ids as in transformers) as a tuple of checked ids."""
    if isinstance(eos_token_id, (list, tuple)):
        if not eos_token_id:
            raise ValueError("eos_token_id must be None, a token id or a non-empty list of them, got []")
        for value in eos_token_id:
            check_token_id("eos_token_id", value, vocab_size)
        return tuple(eos_token_id)
    check_token_id("eos_token_id", eos_token_id, vocab_size)
    return () if eos_token_id is None else (eos_token_id,)


def _decode(model, cache, runner, logits, max_new_tokens, options, generator, vocab, seen, stops, pad,
            eos_ids, done, keep_cache_current):
    batch, device = logits.shape[0], logits.device
    can_finish = bool(eos_ids) or stops is not None  # else no per-step host sync
    for i in range(max_new_tokens):
        token = sample_next(logits, options, generator, vocab, seen)
        if can_finish:
            token = torch.where(done, torch.full_like(token, pad), token)
            finished = torch.zeros_like(done)
            for eos in eos_ids:
                finished |= token == eos
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
             stream: bool = False, **options) -> torch.Tensor | list[torch.Tensor] | Iterator[torch.Tensor] | None:
    """The prompt followed by the new tokens. For a (B, L) tensor (with or without
    attention_mask) a (B, L + new) tensor of its dtype (int64 where that dtype cannot hold every
    token id), finished rows padded; for a list of prompts a list
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
        dtype = input_ids.dtype if _holds_ids(input_ids.dtype, model.config.vocab_size) else torch.long
        return torch.cat([input_ids.to(dtype), torch.stack(new, dim=1).to(input_ids.device, dtype)], dim=1)
    out = []
    eos_ids, stop = eos_token_ids(options.get("eos_token_id"), model.config.vocab_size), options.get("stop")
    for i, prompt in enumerate(input_ids):
        row = [int(t[i]) for t in new]
        ends = [n for n, token in enumerate(row) if token in eos_ids]
        if ends:
            row = row[:ends[0] + 1]
        if stop is not None:
            row = cut_at_stop(row, stop, options.get("tokenizer"))
        out.append(torch.cat([torch.as_tensor(prompt, dtype=torch.long).cpu(), torch.tensor(row, dtype=torch.long)]))
    return out


def _holds_ids(dtype: torch.dtype, vocab_size: int) -> bool:
    """Whether an integer dtype holds every token id (uint8 does not hold those of a 300-token vocabulary)."""
    return torch.iinfo(dtype).max >= vocab_size - 1


_stream = stream  # generate's keyword argument `stream` shadows the function
