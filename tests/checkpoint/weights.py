"""Random weights for the checkpoint tests: every parameter whose default init is a constant or
a fixed formula (A_log, D, norms, biases, dt_proj) gets a distinct random value, so that a key
that is dropped, swapped, left at its init, re-initialized or rescaled by a loader changes the
logits far beyond the tolerances used."""

from __future__ import annotations

import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 1, matrices: bool = True) -> torch.nn.Module:
    """In mambakit's or transformers' naming. With matrices=False the weight matrices keep their
    (scaled) random init, which keeps the logits of a deep model in a sane range."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 0.5)
        elif "norm" in name:
            p.copy_(1 + 0.2 * r)
        elif matrices or p.ndim == 1 or "dt_proj" in name:
            p.copy_(0.2 * r)
    return model


def randomize_constants_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    return randomize_(model, seed, matrices=False)
