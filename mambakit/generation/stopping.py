"""Stop strings: a row of a generation finishes once the decoded text of its new tokens holds
one of them (checked on the host, after each step)."""

from __future__ import annotations

from typing import Sequence

import torch


class StopStrings:
    """Per-row stop strings, checked on the decoded text of each row's new tokens."""

    def __init__(self, stop: str | Sequence[str], tokenizer, batch: int):
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
        if not stop or not all(stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer= to decode the generated tokens")
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode(ids) method, got {type(tokenizer).__name__}")
        self.stop, self.tokenizer = list(stop), tokenizer
        self.new: list[list[int]] = [[] for _ in range(batch)]

    def hit(self, tokens: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """tokens, done: (B,) -> (B,) bool: the rows whose text now holds a stop string."""
        hits = torch.zeros_like(done)
        for i, tok in enumerate(tokens.tolist()):
            if done[i]:
                continue
            self.new[i].append(tok)
            text = self.tokenizer.decode(self.new[i])
            hits[i] = any(s in text for s in self.stop)
        return hits


def cut_at_stop(row: list[int], stop: str | Sequence[str], tokenizer) -> list[int]:
    """The tokens of `row` up to the one that completes the first stop string (all of them if none)."""
    stop = [stop] if isinstance(stop, str) else list(stop)
    for n in range(1, len(row) + 1):
        if any(s in tokenizer.decode(row[:n]) for s in stop):
            return row[:n]
    return row
