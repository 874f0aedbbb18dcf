"""transformers' Mamba-family models on mambakit's kernels.

transformers (5.x) gives each Mamba-family module (`transformers.models.<model>.modeling_<model>`)
module-level functions, each standing for one official entry point: with mamba_ssm /
causal_conv1d installed and CUDA inputs they call the official kernels, elsewhere a slow torch
fallback (the fused `..._split_conv1d_scan_combined` and `mamba_inner_fn` fall back to None: the
layer then runs step by step). The layers look these names up in their module when they run, so
replacing them switches every layer of that model, on every device, to mambakit's entry points
with the official signatures (conv.py, state_update.py, mamba1.py, mamba2.py). Each replacement
is called as the official function would be: the call's keyword arguments that the official
signature does not name are dropped, as transformers drops them. Names a version lacks are
skipped; `unpatch_transformers()` puts every replaced function back."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterable

from .conv import causal_conv1d_fn, causal_conv1d_update
from .mamba1 import selective_scan_fn
from .mamba2 import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
from .state_update import selective_state_update

MODELS = ("mamba", "falcon_mamba", "jamba", "mamba2", "bamba", "nemotron_h", "falcon_h1", "zamba2",
          "granitemoehybrid")

_OFFICIAL = {  # a name in a modeling module -> the entry point it stands for
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "mamba_selective_scan": selective_scan_fn,
    "selective_scan_fn": selective_scan_fn,
    "mamba_selective_state_update": selective_state_update,
    "mamba2_selective_state_update": selective_state_update,
    "selective_state_update": selective_state_update,
    "mamba2_chunk_scan": mamba_chunk_scan_combined,
    "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
    "mamba2_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
    "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
}
_originals: dict[tuple[str, str], object] = {}  # (module, name) -> transformers' own function


def patch_transformers(models: Iterable[str] | None = None) -> list[str]:
    """Makes transformers' Mamba-family models (all of MODELS, or those named) call mambakit's
    kernels. Returns the functions replaced, as "model.name". Calling it again is harmless;
    `unpatch_transformers()` restores the originals."""
    try:
        importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError("patch_transformers() needs the transformers package") from err
    wanted = MODELS if models is None else tuple(models)
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        raise ValueError(f"patch_transformers: unknown models {unknown}; known: {list(MODELS)}")
    replaced = []
    for model in wanted:
        module = _modeling_module(model)
        if module is None:
            continue
        for name, official in _OFFICIAL.items():
            current = getattr(module, name, None)
            if not callable(current):
                continue
            if not getattr(current, "_mambakit_patch", False):
                _originals[(module.__name__, name)] = current
                setattr(module, name, _as_official_call(official))
            replaced.append(f"{model}.{name}")
    if not replaced:
        raise RuntimeError("patch_transformers(): this transformers version exposes none of the Mamba kernel "
                           f"entry points mambakit knows ({sorted(_OFFICIAL)}) in {list(wanted)}")
    return replaced


def unpatch_transformers() -> None:
    """Puts back every function that patch_transformers() replaced."""
    for (module_name, name), original in _originals.items():
        setattr(importlib.import_module(module_name), name, original)
    _originals.clear()


def _modeling_module(model: str):
    try:
        return importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    except ImportError:  # a transformers without this model
        return None


def _as_official_call(official):
    """official, called with only the keyword arguments its signature names (transformers passes
    the model's own keyword arguments through to these functions)."""
    accepted = frozenset(inspect.signature(official).parameters)

    @functools.wraps(official)
    def call(*args, **kwargs):
        return official(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    call._mambakit_patch = True
    return call
