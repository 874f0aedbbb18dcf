"""LMCache: the whole recurrent state of a language model between tokens (one MambaState per
layer, and the logits for the next token), and its file format for saving a conversation and
continuing it later.

A cache fits one model only. It remembers the architecture of the model that made it (the
config fields that decide what the state means, `architecture_of`), saves it in the file's
metadata, and `check_fits(model)` refuses it, saying what differs, for a model with another
layer count, other state shapes or dtypes, or another architecture. `generate` checks the cache
it is given; `LMCache.load(path, model=model)` checks the file and converts its states to the
model's dtypes and device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..modules import MambaState

FORMAT = "mambakit-cache"
# the model config fields that decide what a recurrent state means (not how the weights were
# initialised); the value is read from the attribute on the right, so that equal models written
# differently (dt_rank "auto" or its value, vocab_size 50277 or 50280 padded) compare equal
ARCHITECTURE_FIELDS = {
    "d_model": "d_model", "n_layer": "n_layer", "vocab_size": "padded_vocab_size", "d_state": "d_state",
    "d_conv": "d_conv", "expand": "expand", "dt_rank": "resolved_dt_rank", "layer": "layer", "gate": "gate",
    "conv_bias": "conv_bias", "bias": "bias", "rms_norm": "rms_norm", "norm_epsilon": "norm_epsilon",
    "residual_in_fp32": "residual_in_fp32", "headdim": "headdim", "ngroups": "ngroups",
}


def architecture_of(config) -> dict:
    """The architecture fields of a model config (ARCHITECTURE_FIELDS) that it has, as plain values."""
    arch = {}
    for name, attribute in ARCHITECTURE_FIELDS.items():
        value = getattr(config, attribute, None)
        if isinstance(value, (bool, int, float, str)):
            arch[name] = value
    return arch


@dataclass
class LMCache:
    """The whole recurrent state of a MambaLM: one MambaState per layer, and the logits for the
    next token. Its size does not depend on how many tokens it has seen (`seqlen`), so a whole
    conversation's state fits in a few MB and can be saved, loaded and continued exactly."""
    layers: list[MambaState]
    seqlen: int = 0
    last_logits: torch.Tensor | None = None  # (B, V) after prefill / each step
    architecture: dict | None = None  # architecture_of(the config of the model that made it), if known

    @property
    def batch_size(self) -> int:
        return self.layers[0].ssm.shape[0]

    def nbytes(self) -> int:
        extra = 0 if self.last_logits is None else self.last_logits.nbytes
        return sum(s.conv.nbytes + s.ssm.nbytes for s in self.layers) + extra

    def check_fits(self, model) -> None:
        """A ValueError saying what differs unless this cache can continue `model`: the same
        layer count, the same architecture (when the cache knows it), every state of the shape
        and dtype that model.allocate_cache gives at this batch, on the model's device, and
        next-token logits (B, >= vocab_size). A TypeError if it is not a cache of tensors."""
        check_states(self)
        expected = model.allocate_cache(self.batch_size, device="meta")  # shapes and dtypes, no memory
        if len(self.layers) != len(expected.layers):
            raise ValueError(f"the cache holds {len(self.layers)} layers, the model has {len(expected.layers)}")
        _check_architecture(self.architecture, architecture_of(model.config))
        device = _device_of(model)
        for i, (have, want) in enumerate(zip(self.layers, expected.layers)):
            for part in ("conv", "ssm"):
                _check_state_tensor(f"layer {i}'s {part} state", getattr(have, part), getattr(want, part), device)
        if self.last_logits is not None:
            vocab = model.config.vocab_size
            if self.last_logits.shape[1] < vocab:
                raise ValueError(f"the cache's next-token logits cover {self.last_logits.shape[1]} tokens, "
                                 f"the model's vocabulary has {vocab}")
            if device is not None and self.last_logits.device != device:
                raise ValueError(f"the cache's next-token logits are on {self.last_logits.device}, "
                                 f"the model is on {device}")

    def with_dtypes_of(self, model) -> "LMCache":
        """This cache with its states converted to the dtypes that `model` keeps its own cache
        in (a cache saved from a bfloat16 model, for an fp32 one); `check_fits` says whether it fits."""
        expected = model.allocate_cache(self.batch_size, device="meta").layers
        layers = [MambaState(have.conv.to(want.conv.dtype), have.ssm.to(want.ssm.dtype))
                  for have, want in zip(self.layers, expected)]
        return LMCache(layers + self.layers[len(layers):], self.seqlen, self.last_logits, self.architecture)

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically (a crash leaves the old file or the new one)."""
        from safetensors.torch import save_file
        check_states(self)
        tensors = {}
        for i, state in enumerate(self.layers):
            tensors[f"layers.{i}.conv"] = state.conv.contiguous()
            tensors[f"layers.{i}.ssm"] = state.ssm.contiguous()
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits.contiguous()
        meta = {"format": FORMAT, "seqlen": str(self.seqlen), "n_layer": str(len(self.layers))}
        if self.architecture is not None:
            meta["architecture"] = json.dumps(self.architecture, sort_keys=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device=None, model=None) -> "LMCache":
        """The cache saved at `path`, on `device` (default: the model's, else the CPU). With
        `model`, its states are converted to the model's dtypes and checked to fit it
        (`check_fits`). A file that is not a whole mambakit cache, or one made for another
        model, is a ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cache file at {path}")
        if device is None and model is not None:
            device = _device_of(model)
        try:
            cache = _read(path, device)
            check_states(cache)
            if model is not None:
                cache = cache.with_dtypes_of(model)
                cache.check_fits(model)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{path}: {err}") from None
        return cache


def check_states(cache: LMCache) -> None:
    """A TypeError / ValueError unless the cache is a non-empty list of MambaStates of floating
    tensors conv (B, D, K-1) and ssm (B, D, N) that agree on B and D, with an int seqlen >= 0
    and next-token logits (B, V) or None. What a cache holds on its own, whatever the model."""
    if not isinstance(cache, LMCache):
        raise TypeError(f"cache must be an LMCache (from model.prefill, model.allocate_cache or LMCache.load), "
                        f"got {type(cache).__name__}")
    if not isinstance(cache.layers, (list, tuple)) or not cache.layers:
        raise ValueError("the cache holds no layers")
    for i, state in enumerate(cache.layers):
        if not isinstance(state, MambaState):
            raise TypeError(f"the cache's layer {i} must be a MambaState, got {type(state).__name__}")
        for part in ("conv", "ssm"):
            _require_float(f"layer {i}'s {part} state", getattr(state, part), (3,) if part == "conv" else (3, 4))
        if state.conv.shape[:2] != cache.layers[0].ssm.shape[:2] or state.ssm.shape[:2] != state.conv.shape[:2]:
            raise ValueError(f"layer {i}'s states conv {tuple(state.conv.shape)} and ssm {tuple(state.ssm.shape)} "
                             f"disagree with layer 0's ssm {tuple(cache.layers[0].ssm.shape)} on (batch, channels)")
    seqlen = cache.seqlen
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 0:
        raise ValueError(f"the cache's seqlen must be an int >= 0, got {seqlen!r}")
    logits = cache.last_logits
    if logits is not None:
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError(f"the cache's next-token logits must be a floating tensor, got {_describe(logits)}")
        if logits.ndim != 2 or logits.shape[0] != cache.batch_size:
            raise ValueError(f"the cache's next-token logits must have shape (B={cache.batch_size}, V), "
                             f"got {tuple(logits.shape)}")


def _require_float(name: str, t, ndims: tuple[int, ...]) -> None:
    """A floating tensor of one of `ndims` dims: the conv state (B, D, K-1), the SSM state
    (B, D, N) of Mamba-1 or (B, H, P, N) of Mamba-2."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {_describe(t)}")
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims (B, D, *), got shape {tuple(t.shape)}")


def _describe(t) -> str:
    return f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_architecture(mine: dict | None, model: dict) -> None:
    if not mine:
        return
    differ = [f"{k}={mine[k]!r} (the model has {model[k]!r})"
              for k in sorted(mine) if k in model and mine[k] != model[k]]
    if differ:
        raise ValueError(f"the cache was made by another model: {', '.join(differ)}")


def _check_state_tensor(name: str, have: torch.Tensor, want: torch.Tensor, device) -> None:
    if have.shape != want.shape:
        raise ValueError(f"{name} has shape {tuple(have.shape)}, the model needs {tuple(want.shape)} "
                         f"(batch {want.shape[0]}, {want.shape[1]} channels, {want.shape[2]} per channel)")
    if have.dtype != want.dtype:
        raise ValueError(f"{name} is {have.dtype}, the model keeps it in {want.dtype} "
                         f"(LMCache.load(path, model=model) converts a saved cache)")
    if device is not None and have.device != device:
        raise ValueError(f"{name} is on {have.device}, the model is on {device}")


def _device_of(model) -> torch.device | None:
    """The device of the model's parameters, or None for a model without any."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return None if first is None else first.device


def _read(path: Path, device) -> LMCache:
    """The cache in a safetensors file, with its metadata checked: a ValueError for anything else."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a mambakit cache (metadata format {meta.get('format')!r})")
            n_layer, seqlen = _meta_int(meta, "n_layer", 1), _meta_int(meta, "seqlen", 0)
            keys = set(f.keys())
            if len(keys) < 2 * n_layer:
                raise ValueError(f"the metadata says n_layer={n_layer} ({2 * n_layer} state tensors) "
                                 f"but the file holds {len(keys)} tensors")
            layers = []
            for i in range(n_layer):
                missing = [k for k in (f"layers.{i}.conv", f"layers.{i}.ssm") if k not in keys]
                if missing:
                    raise ValueError(f"the metadata says n_layer={n_layer} but the file has no tensor {missing[0]}")
                layers.append(MambaState(f.get_tensor(f"layers.{i}.conv"), f.get_tensor(f"layers.{i}.ssm")))
            logits = f.get_tensor("last_logits") if "last_logits" in keys else None
    except SafetensorError as err:
        raise ValueError(f"not a readable cache file (empty, truncated or not safetensors): {err}") from None
    return LMCache(layers, seqlen, logits, _meta_architecture(meta))


def _meta_int(meta: dict, key: str, minimum: int) -> int:
    text = meta.get(key)
    if text is None:
        raise ValueError(f"the cache metadata has no {key!r}")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"the cache metadata's {key!r} must be an int, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"the cache metadata's {key!r} must be >= {minimum}, got {value}")
    return value


def _meta_architecture(meta: dict) -> dict | None:
    """The saved architecture (None in a file from before it was saved)."""
    text = meta.get("architecture")
    if text is None:
        return None
    try:
        arch = json.loads(text)
    except json.JSONDecodeError:
        arch = None
    if not isinstance(arch, dict) or not all(isinstance(v, (bool, int, float, str)) for v in arch.values()):
        raise ValueError(f"the cache metadata's 'architecture' must be a JSON object of plain values, "
                         f"got {text[:80]!r}")
    return arch
