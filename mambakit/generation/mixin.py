"""GenerationMixin: the `generate` method of the language models, as in transformers and
mamba_ssm. A model class inherits it; generation never imports the models."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .loop import generate


class GenerationMixin:
    """`model.generate(...)` for a model with the interface that generation drives: `config`
    (its `vocab_size`), `prefill(input_ids, attention_mask=, cache=)`, `step(token_ids, cache)`
    and `allocate_cache(batch_size, device=)`."""

    def generate(self, input_ids: torch.Tensor | Sequence | None = None, max_new_tokens: int = 64,
                 **kwargs) -> torch.Tensor | list[torch.Tensor] | Iterator[torch.Tensor] | None:
        """See `mambakit.generation.generate`: prompts (a tensor, a padded tensor with
        attention_mask, or a list of different lengths) or a cache, sampling options,
        eos_token_id / stop strings, stream=True."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
