"""Reading and writing MambaLM checkpoints in three formats.

- "mambakit": config.json (MambaConfig fields, "format": "mambakit") + model.safetensors,
  with the official key names.
- "hf": Hugging Face `MambaForCausalLM` (config.json with hidden_size, state_size, ... and
  `backbone.embeddings.*` keys) + model.safetensors. Reading also takes sharded safetensors
  (model.safetensors.index.json) and pytorch_model.bin.
- "official": mamba_ssm's config.json (d_model, ssm_cfg, ...) + pytorch_model.bin, which is
  what `MambaLMHeadModel.from_pretrained` reads.

Every file is written atomically: to a temporary file in the same directory, then renamed.
`.bin` files are read only with `torch.load(..., weights_only=True)`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .config import MambaConfig

FORMATS = ("mambakit", "hf", "official")
_HF_PREFIX, _OURS_PREFIX = "backbone.embeddings.", "backbone.embedding."


# ---- atomic files ----------------------------------------------------------------------------

def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) for a temporary file next to `path`, then renames it over `path`,
    so `path` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it owner-only; a checkpoint is shared like any file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, write)


# ---- locating a checkpoint -------------------------------------------------------------------

def resolve_directory(name_or_path: str | Path) -> Path:
    """A local directory, or the snapshot of a hub id already in the local Hugging Face cache.
    Nothing is downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        latest = path / "latest"  # a `mambakit train` run directory: its newest checkpoint
        if not (path / "config.json").is_file() and latest.is_file():
            return path / latest.read_text().strip()
        return path
    if path.exists():
        raise ValueError(f"{str(name_or_path)!r} is a file; from_pretrained needs a checkpoint directory")
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(repo_id=str(name_or_path), local_files_only=True))
    except Exception as err:  # not in the cache, or not a valid repo id
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a local directory nor a model in the local Hugging Face cache "
            f"(looked in {Path(name_or_path).expanduser().resolve()} and {constants.HF_HUB_CACHE}). mambakit never "
            f"downloads; fetch it first (e.g. `hf download {name_or_path}`) or pass a directory. ({type(err).__name__})"
        ) from None


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

def load_pretrained(cls, name_or_path, device=None, dtype=None):
    directory = resolve_directory(name_or_path)
    config, _ = read_config(directory)
    state = {(_OURS_PREFIX + k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k): v
             for k, v in read_state_dict(directory).items()}
    model = cls(config, device=device, dtype=dtype)
    load_state_dict_strict(model, state, source=str(directory))
    return model


def load_state_dict_strict(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
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

def save_pretrained(model, directory: str | Path, format: str = "mambakit") -> None:
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
        state = {(_HF_PREFIX + k[len(_OURS_PREFIX):] if k.startswith(_OURS_PREFIX) else k): v
                 for k, v in state.items()}
    else:
        raw = {"format": "mambakit", "mambakit_version": _version(), **config.to_dict()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / "config.json", raw)
    _remove_shadowing(directory, keep="model.safetensors")


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _remove_shadowing(directory: Path, keep: str) -> None:
    """Removes weight files of an earlier save in another format, which the loader would
    otherwise read instead of the file just written."""
    for name in _WEIGHT_FILES:
        if name != keep and (directory / name).is_file():
            (directory / name).unlink()


def _version() -> str:
    from . import __version__
    return __version__
