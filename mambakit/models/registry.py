"""The model registry: every named model, whatever its family, built by one
`create_model(name, **overrides)`, in the manner of timm.

A name maps to a builder: a function of keyword overrides (the fields of the family's config,
and for the language models `device` and `dtype`) that returns a fresh, randomly initialised
model. Each model file registers its own presets when it is imported, and importing
`mambakit.models` imports them all: lm.py the language-model presets (`mambakit.PRESETS`: tiny,
130m, ...) and the synthetic tasks' small LM, vision.py the Vim presets and the digits task's Vim.
Later architectures (Mamba-2, hybrids) register here the same way.

This file imports no model, so that every model file can import it."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder) -> ModelBuilder:
    """Makes `create_model(name, **overrides)` return `builder(**overrides)`. A name is
    registered once; returns the builder, so that this also works as a decorator's body."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise TypeError(f"the builder of model {name!r} must be callable, got {type(builder).__name__}")
    if name in _BUILDERS:
        raise ValueError(f"a model named {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A new model of the registered preset `name`, with any of its config fields overridden
    (e.g. `create_model("130m", n_layer=2)`, `create_model("vim_tiny", num_classes=10, img_size=64)`)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return builder(**overrides)


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_BUILDERS)
