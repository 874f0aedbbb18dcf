"""LMCache: the whole recurrent state of a language model between tokens (one MambaState per
layer, and the logits for the next token), and its file format for saving a conversation and
continuing it later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..modules import MambaState


@dataclass
class LMCache:
    """The whole recurrent state of a MambaLM: one MambaState per layer, and the logits for the
    next token. Its size does not depend on how many tokens it has seen (`seqlen`), so a whole
    conversation's state fits in a few MB and can be saved, loaded and continued exactly."""
    layers: list[MambaState]
    seqlen: int = 0
    last_logits: torch.Tensor | None = None  # (B, V) after prefill / each step

    @property
    def batch_size(self) -> int:
        return self.layers[0].ssm.shape[0]

    def nbytes(self) -> int:
        extra = 0 if self.last_logits is None else self.last_logits.nbytes
        return sum(s.conv.nbytes + s.ssm.nbytes for s in self.layers) + extra

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically (a crash leaves the old file or the new one)."""
        from safetensors.torch import save_file
        tensors = {}
        for i, state in enumerate(self.layers):
            tensors[f"layers.{i}.conv"] = state.conv.contiguous()
            tensors[f"layers.{i}.ssm"] = state.ssm.contiguous()
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits.contiguous()
        meta = {"format": "mambakit-cache", "seqlen": str(self.seqlen), "n_layer": str(len(self.layers))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device=None) -> "LMCache":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cache file at {path}")
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "mambakit-cache":
                raise ValueError(f"{path} is not a mambakit cache (metadata format {meta.get('format')!r})")
            n_layer = int(meta["n_layer"])
            layers = [MambaState(f.get_tensor(f"layers.{i}.conv"), f.get_tensor(f"layers.{i}.ssm"))
                      for i in range(n_layer)]
            logits = f.get_tensor("last_logits") if "last_logits" in f.keys() else None
        return cls(layers, int(meta["seqlen"]), logits)
