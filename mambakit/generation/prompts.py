"""A batch of prompts of different lengths, packed into one row for a varlen prefill.

Padding never enters the recurrent state: the valid tokens of every prompt are laid end to end
(1, T) with offsets cu_seqlens (S + 1,), and the conv and the scan restart at each offset. So a
prompt in a batch gives exactly the state it gives alone, whatever the others' lengths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedPrompts:
    ids: torch.Tensor  # (1, T) int64, the prompts end to end
    cu_seqlens: torch.Tensor  # (S + 1,) int32 offsets
    prompts: list[torch.Tensor]  # each prompt's valid ids, (L_i,)

    @property
    def lengths(self) -> list[int]:
        return [p.numel() for p in self.prompts]

    @property
    def last_positions(self) -> torch.Tensor:
        """Index in `ids` of each prompt's last token, (S,)."""
        return self.cu_seqlens[1:].long() - 1


def pack_prompts(input_ids: torch.Tensor | Sequence, attention_mask: torch.Tensor | None = None,
                 device=None) -> PackedPrompts:
    """input_ids: a list of prompts (lists of ints or 1-D tensors), or a (B, L) tensor with an
    optional (B, L) attention_mask of 0/1 whose ones in each row are one run (left or right
    padding). Returns the packed prompts; an empty prompt or a bad mask is an error."""
    if isinstance(input_ids, torch.Tensor):
        _require_ids("input_ids", input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        device = device or input_ids.device
        if attention_mask is None:
            prompts = list(input_ids)
        else:
            prompts = _unpad(input_ids, attention_mask)
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a (B, L) tensor of input_ids, not with a list of prompts")
        if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or len(input_ids) == 0:
            raise TypeError("input_ids must be a (B, L) tensor or a non-empty list of prompts (lists of token ids)")
        prompts = [_prompt(i, p) for i, p in enumerate(input_ids)]
    prompts = [p.to(device=device, dtype=torch.long) for p in prompts]
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty")
    lengths = torch.tensor([0] + [p.numel() for p in prompts])
    cu = torch.cumsum(lengths, 0).to(device=device, dtype=torch.int32)
    return PackedPrompts(torch.cat(prompts)[None], cu, prompts)


def _require_ids(name: str, t: torch.Tensor) -> None:
    """An integer tensor that holds values (not a meta tensor)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got a {t.dtype} tensor")
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor: it has a shape but no values to generate from")


def _prompt(i: int, prompt) -> torch.Tensor:
    """Prompt i of a list: a 1-D tensor of its token ids (a list of ints, or an integer tensor)."""
    if not isinstance(prompt, torch.Tensor):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {i} must be a list of int token ids or a 1-D tensor, got {type(prompt).__name__}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"prompt {i} must be a list of int token ids, got {prompt!r:.80}")
        if any(not -2**63 <= t < 2**63 for t in prompt):
            raise ValueError(f"prompt {i} has a token id out of the int64 range")
        prompt = torch.tensor(prompt, dtype=torch.long)
    if prompt.numel() == 0:
        return prompt
    _require_ids(f"prompt {i}", prompt)
    if prompt.ndim != 1:
        raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {tuple(prompt.shape)}")
    return prompt


def _unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {got}")
    if attention_mask.is_meta:
        raise ValueError("attention_mask is a meta tensor: it has a shape but no values")
    if ((attention_mask != 0) & (attention_mask != 1)).any():  # before any cast: 0.5 would become 0
        raise ValueError("attention_mask must hold only 0 and 1")
    mask = attention_mask.to(torch.long)
    prompts = []
    for i, (row, m) in enumerate(zip(input_ids, mask)):
        ones = torch.nonzero(m)[:, 0]
        if ones.numel() == 0:
            raise ValueError(f"attention_mask row {i} has no ones: prompt {i} is empty")
        first, last = int(ones[0]), int(ones[-1])
        if last - first + 1 != ones.numel():
            raise ValueError(f"attention_mask row {i} has a gap: its ones must be one run (left or right padding)")
        prompts.append(row[first:last + 1])
    return prompts
