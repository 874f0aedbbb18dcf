"""GenerationMixin: the `generate` method of the language models, as in transformers and
mamba_ssm. A model class inherits it; generation never imports the models."""

from __future__ import annotations

import types
from typing import Iterator, Sequence

import torch

from .conventions import new_token_budget, sampling_temperature, with_generation_config
from .loop import generate as generate_tokens


class GenerationMixin:
    """`model.generate(...)` for a model with the interface that generation drives: `config`
    (its `vocab_size`), `prefill(input_ids, attention_mask=, cache=)`, `step(token_ids, cache)`
    and `allocate_cache(batch_size, device=)`."""

    def __init_subclass__(cls, **kwargs):
        """Each model class gets its own copy of `generate`, named after it, so that a wrong
        argument reads `MambaLM.generate() got an unexpected keyword argument 'foo'`."""
        super().__init_subclass__(**kwargs)
        if "generate" not in cls.__dict__:
            cls.generate = _renamed(GenerationMixin.generate, f"{cls.__name__}.generate")

    def generate(self, input_ids: torch.Tensor | Sequence | None = None, max_new_tokens: int | None = None, *,
                 attention_mask: torch.Tensor | None = None, cache=None, max_length: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, tokenizer=None,
                 stream: bool = False, cuda_graph: bool | None = None, generation_config=None
                 ) -> torch.Tensor | list[torch.Tensor] | Iterator[torch.Tensor] | None:
        """The prompt followed by the new tokens (see `mambakit.generation.generate`): prompts
        (a (B, L) tensor, optionally with attention_mask, or a list of different lengths) or a
        cache; sampling options; eos_token_id (an id or a list) / stop strings, finished rows
        padded with pad_token_id; stream=True for an iterator of the new tokens.

        With transformers' conventions (conventions.py): do_sample=False is greedy whatever the
        temperature, max_length counts the prompt, and a generation_config (transformers'
        GenerationConfig or any object with those attributes) gives the options not passed
        here. Without max_new_tokens or max_length, 64 new tokens."""
        options = with_generation_config(generation_config, dict(
            max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop=stop))
        budget = new_token_budget(options.pop("max_new_tokens"), options.pop("max_length"), input_ids, cache)
        options["temperature"] = sampling_temperature(options.pop("do_sample"), options["temperature"])
        return generate_tokens(self, input_ids, max_new_tokens=budget, attention_mask=attention_mask, cache=cache,
                               seed=seed, tokenizer=tokenizer, stream=stream, cuda_graph=cuda_graph, **options)


def _renamed(function: types.FunctionType, qualname: str) -> types.FunctionType:
    """A copy of function whose qualified name (the one Python's argument errors print) is qualname."""
    code = function.__code__
    if hasattr(code, "co_qualname"):  # Python 3.11+ prints the code's name; 3.10 the function's
        code = code.replace(co_qualname=qualname)
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = dict(function.__kwdefaults__ or {})
    copy.__qualname__, copy.__doc__, copy.__module__ = qualname, function.__doc__, function.__module__
    copy.__annotations__ = dict(function.__annotations__)
    return copy
