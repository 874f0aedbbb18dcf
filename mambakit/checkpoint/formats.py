"""Reading and writing MambaLM checkpoints in three formats.

- "mambakit": config.json (MambaConfig fields, "format": "mambakit") + model.safetensors,
  with the official key names.
- "hf": Hugging Face `MambaForCausalLM` (config.json with hidden_size, state_size, ... and
  `backbone.embeddings.*` keys) + model.safetensors. Reading also takes sharded safetensors
  (model.safetensors.index.json) and pytorch_model.bin.
- "official": mamba_ssm's config.json (d_model, ssm_cfg, ...) + pytorch_model.bin, which is
  what `MambaLMHeadModel.from_pretrained` reads.

Every file is written atomically (files.py). `.bin` files are read only with
`torch.load(..., weights_only=True)`. The model class is passed in (`load_pretrained(cls, ...)`),
so this package never imports the models."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..config import MambaConfig
from .files import atomic_write, atomic_write_json
from .hub import resolve_directory

FORMATS = ("mambakit", "hf", "official")
_HF_PREFIX, _OURS_PREFIX = "backbone.embeddings.", "backbone.embedding."
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")

Model = TypeVar("Model", bound=nn.Module)


# ---- key and config conversion ---------------------------------------------------------------

def _keys_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face's `backbone.embeddings.*` -> the official `backbone.embedding.*`; other keys as they are."""
    return {(_OURS_PREFIX + k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k): v for k, v in state.items()}


def _keys_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(_HF_PREFIX + k[len(_OURS_PREFIX):] if k.startswith(_OURS_PREFIX) else k): v for k, v in state.items()}


def read_config(directory: Path) -> tuple[MambaConfig, str]:
    """Returns (config, format) from config.json."""
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("format") == "mambakit":
        return MambaConfig.from_dict({k: v for k, v in raw.items() if k not in ("format", "mambakit_version")}), "mambakit"
    if "hidden_size" in raw or raw.get("model_type") == "mamba":
        return MambaConfig.from_hf(raw), "hf"
    if "d_model" in raw:
        return MambaConfig.from_official(raw), "official"
    raise ValueError(f"{path} is neither a mambakit, a Hugging Face Mamba nor an official mamba_ssm config")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = directory / index_name
        if index.is_file():
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(str(directory / shard)))
            return state
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(str(directory / "pytorch_model.bin"))
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, a sharded "
                            f"model.safetensors.index.json, or pytorch_model.bin")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- loading ---------------------------------------------------------------------------------

def load_pretrained(cls: type[Model], name_or_path: str | Path, device=None, dtype=None) -> Model:
    """`cls(config, device=device, dtype=dtype)` with the weights of a checkpoint directory (any
    of the three formats) or of a hub id in the local Hugging Face cache."""
    directory = resolve_directory(name_or_path)
    config, _ = read_config(directory)
    state = _keys_from_hf(read_state_dict(directory))
    model = cls(config, device=device, dtype=dtype)
    load_state_dict_strict(model, state, source=str(directory))
    return model


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads `state` into `model`, or raises ValueError listing every missing key, unexpected
    key and shape mismatch. A tied lm_head may be absent from `state`."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    state = dict(state)
    if tied and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        emb = state.get("backbone.embedding.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise ValueError(f"{source}: lm_head.weight differs from the embedding, but the config ties them "
                             f"(tie_embeddings=True)")
    wanted = {k for k in expected if not (tied and k == "lm_head.weight")}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in wanted & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys: {missing}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys: {unexpected}"] if unexpected else []
        parts += [f"{len(shapes)} shape mismatches: {shapes}"] if shapes else []
        raise ValueError(f"{source} does not match the model config: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)  # the tied lm_head follows the embedding


# ---- saving ----------------------------------------------------------------------------------

def save_pretrained(model: nn.Module, directory: str | Path, format: str = "mambakit") -> None:
    """Writes `model` (its `.config` is a MambaConfig) to `directory` in one of FORMATS."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: MambaConfig = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if format == "official":
        raw = config.to_official()  # before writing anything: it raises for an inexpressible config
        atomic_write(directory / "pytorch_model.bin", lambda tmp: torch.save(state, tmp))
        atomic_write_json(directory / "config.json", raw)
        _remove_shadowing(directory, keep="pytorch_model.bin")
        return
    from safetensors.torch import save_file
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    if format == "hf":
        raw = config.to_hf()
        state = _keys_to_hf(state)
    else:
        raw = {"format": "mambakit", "mambakit_version": _package_version(), **config.to_dict()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / "config.json", raw)
    _remove_shadowing(directory, keep="model.safetensors")


def _remove_shadowing(directory: Path, keep: str) -> None:
    """Removes weight files of an earlier save in another format, which the loader would
    otherwise read instead of the file just written."""
    for name in _WEIGHT_FILES:
        if name != keep and (directory / name).is_file():
            (directory / name).unlink()


def _package_version() -> str:
    """The installed mambakit's version from the package metadata ("0+unknown" when mambakit
    runs from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("mambakit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
