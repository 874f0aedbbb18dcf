"""transformers' generate options in mambakit's terms: `do_sample`, `max_length` and a
`generation_config` (transformers' GenerationConfig, or any object with those attributes).

- do_sample=False is greedy whatever the temperature; do_sample=True samples, at temperature 1
  unless one is given; left out (None), mambakit's rule holds: a temperature above 0 samples.
- max_length counts the prompt (its padded length, the longest of a list, and the tokens a cache
  passed in has taken in); max_new_tokens, when given, wins over it, as in transformers.
- an option given to generate wins over the generation_config's; the config's unset (None)
  fields leave mambakit's defaults."""

from __future__ import annotations

import numbers

from .cache import LMCache
from .sampling import MIN_TEMPERATURE, SamplingOptions, short_repr

DEFAULT_MAX_NEW_TOKENS = 64
CONFIG_FIELDS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                 "repetition_penalty", "eos_token_id", "pad_token_id")
ONLY_DEFAULT = {"num_beams": 1, "num_return_sequences": 1}  # config fields whose other values mambakit does not do


def with_generation_config(generation_config, given: dict) -> dict:
    """The options given, each None one taken from generation_config (CONFIG_FIELDS, and its
    stop_strings as `stop`) when it sets it. A config asking for beam search or several
    sequences per prompt is a ValueError rather than silently ignored."""
    if generation_config is None:
        return dict(given)
    for name, only in ONLY_DEFAULT.items():
        value = getattr(generation_config, name, None)
        if value is not None and value != only:
            raise ValueError(f"generation_config.{name}={short_repr(value)} is not supported: mambakit "
                             f"generates one sequence per prompt, greedy or sampled ({name}={only})")
    merged = dict(given)
    for name in CONFIG_FIELDS + ("stop",):
        if merged.get(name) is None:
            merged[name] = getattr(generation_config, "stop_strings" if name == "stop" else name, None)
    return merged


def sampling_temperature(do_sample, temperature) -> float:
    """The temperature that `stream` samples at (0: greedy) under transformers' do_sample."""
    if temperature is not None:
        SamplingOptions(temperature=temperature).check()  # a bad one is an error even when unused
    if do_sample is None:
        return 0.0 if temperature is None else temperature
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be None, True or False, got {short_repr(do_sample)}")
    if not do_sample:
        return 0.0
    if temperature is None:
        return 1.0
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"do_sample=True samples, so temperature must be > 0 (at least {MIN_TEMPERATURE:g}), "
                         f"got {short_repr(temperature)}; do_sample=False is greedy")
    return temperature


def new_token_budget(max_new_tokens, max_length, input_ids, cache) -> int:
    """max_new_tokens when given, else max_length less the tokens it counts (the prompt's and
    the cache's), else DEFAULT_MAX_NEW_TOKENS. max_new_tokens itself is checked by `stream`."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1 (it counts the prompt), got {short_repr(max_length)}")
    counted = _prompt_length(input_ids) + (cache.seqlen if isinstance(cache, LMCache) else 0)
    if max_length < counted:
        raise ValueError(f"max_length={max_length} counts the prompt, which already has {counted} tokens; "
                         f"pass a larger max_length or max_new_tokens")
    return int(max_length) - counted


def _prompt_length(input_ids) -> int:
    """The length max_length counts: a tensor's last dimension (its padding included, as in
    transformers), the longest prompt of a list. What is not a prompt counts 0 here;
    pack_prompts refuses it with its own message."""
    if input_ids is None:
        return 0
    shape = getattr(input_ids, "shape", None)
    if shape is not None:
        return int(shape[-1]) if len(shape) else 0
    try:
        return max((len(p) for p in input_ids if hasattr(p, "__len__")), default=0)
    except TypeError:
        return 0
