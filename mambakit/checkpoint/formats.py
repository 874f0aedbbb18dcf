"""Reading and writing MambaLM checkpoints in three formats, each for Mamba-1 (layer="mamba")
and Mamba-2 (layer="mamba2") models.

- "mambakit": config.json (MambaConfig fields, "format": "mambakit") + model.safetensors,
  with the official key names.
- "hf": Hugging Face `MambaForCausalLM` or `Mamba2ForCausalLM` (config.json with model_type
  "mamba" or "mamba2", hidden_size, state_size, ... and `backbone.embeddings.*` keys) +
  model.safetensors. Reading also takes sharded safetensors (model.safetensors.index.json) and
  pytorch_model.bin.
- "official": mamba_ssm's config.json (d_model, ssm_cfg, ...; ssm_cfg.layer "Mamba2" for
  Mamba-2) + pytorch_model.bin, which is what `MambaLMHeadModel.from_pretrained` reads.

Mamba-2's tensors have the same names in the three formats as Mamba-1's, but for the mixer's
own (`mixer.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}`); only the embedding's
differs in "hf", as for Mamba-1. The config conversions are MambaConfig's (config.py).

Hybrids (attention layers, MLPs): "mambakit" and "official" hold them under the official names
(an attention layer's `mixer.{in_proj, conv1d, out_proj}`, a block's `norm2` and
`mlp.{fc1, fc2}`); "hf" is transformers' `JambaForCausalLM` for Mamba-1 hybrids and
`BambaForCausalLM` for Mamba-2 ones, whose names and layout hf_hybrid.py converts.

The safetensors formats ("mambakit", "hf") are written in shards of at most `max_shard_size`
bytes (5GB by default, the size the published Hugging Face Mamba checkpoints use), as
transformers does: `model-00001-of-0000N.safetensors` ... and `model.safetensors.index.json`
({"metadata": {"total_size": ...}, "weight_map": {tensor name: shard}}); weights below the
limit are one model.safetensors. The official format is always one pytorch_model.bin:
mamba_ssm's loader reads that file only.

A checkpoint directory is written as a whole (files.write_directory): at every instant it is
the complete old checkpoint or the complete new one. `.bin` files are read only with
`torch.load(..., weights_only=True)`. Whatever is wrong in a checkpoint (a config field of the
wrong type, a truncated file, a shard outside the directory, sizes that disagree with the
weights) is a ValueError naming the file, found before the model is allocated: the config's
sizes are checked against the weights' shapes on the meta device first. The model class is
passed in (`load_pretrained(cls, ...)`), so this package never imports the models."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from ..config import HF2_NAMES, HF_NAMES, OFFICIAL2_NAMES, OFFICIAL_NAMES, MambaConfig
from .files import atomic_write, atomic_write_json, write_directory
from .hf_hybrid import from_transformers, to_transformers
from .hub import child_path, resolve_directory

FORMATS = ("mambakit", "hf", "official")
_HF_PREFIX, _OURS_PREFIX = "backbone.embeddings.", "backbone.embedding."
_CONFIG, _SAFETENSORS, _BIN = "config.json", "model.safetensors", "pytorch_model.bin"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_INDEXES = {_SAFETENSORS_INDEX: "safetensors", "pytorch_model.bin.index.json": "bin"}
_WEIGHT_FILES = (_SAFETENSORS, *_INDEXES, _BIN)
_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")  # what save_pretrained names its shards
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MAX_JSON_BYTES = 64 << 20  # a config or an index is kilobytes; more is not one
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

Model = TypeVar("Model", bound=nn.Module)


# ---- key and config conversion ---------------------------------------------------------------

def _keys_from_hf(state: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face's `backbone.embeddings.*` -> the official `backbone.embedding.*`; other keys as they are."""
    return {(_OURS_PREFIX + k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k): v for k, v in state.items()}


def _keys_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(_HF_PREFIX + k[len(_OURS_PREFIX):] if k.startswith(_OURS_PREFIX) else k): v for k, v in state.items()}


def read_config(directory: Path) -> tuple[MambaConfig, str]:
    """Returns (config, format) from config.json; a ValueError names the file and the field."""
    path = Path(directory) / _CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    raw = _read_json(path)
    try:
        if not isinstance(raw, dict):
            raise ValueError(f"a config must be a JSON object, got {type(raw).__name__}")
        if raw.get("format") == "mambakit":
            return MambaConfig.from_dict({k: v for k, v in raw.items() if k not in ("format", "mambakit_version")}), \
                "mambakit"
        if "hidden_size" in raw or ("model_type" in raw and "d_model" not in raw):
            return MambaConfig.from_hf(raw), "hf"
        if "d_model" in raw:
            return MambaConfig.from_official(raw), "official"
        raise ValueError("it is neither a mambakit, a Hugging Face Mamba / Mamba-2 nor an official mamba_ssm config")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, too large for a JSON config or index")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from None


# ---- the weights on disk ---------------------------------------------------------------------

class _Weights:
    """The weight files of a directory: every tensor's shape under the official key names
    (read from the files' headers, no data), and on request the tensors themselves."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files, self.kind = _weight_files(directory)
        self._bin: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        seen: dict[str, Path] = {}
        for path in self.files:
            for key, (shape, dtype) in self._header(path).items():
                if key in seen:
                    raise ValueError(f"{path} and {seen[key]} both hold {key}")
                if dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{path}: {key} is {dtype}; the weights must be floating point")
                seen[key] = path
                self.shapes[key] = shape
        if len(_keys_from_hf(self.shapes)) != len(self.shapes):
            raise ValueError(f"{directory}: the weights hold the embedding under both {_HF_PREFIX}* and {_OURS_PREFIX}*")
        self.shapes = _keys_from_hf(self.shapes)

    def _header(self, path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        if self.kind == "safetensors":
            from safetensors import safe_open
            with _readable(path, "a safetensors file"):
                with safe_open(str(path), "pt") as f:
                    return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        state = _load_bin(path)  # memory-mapped where the format allows: no data is read yet
        self._bin.update(state)
        return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in state.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, keyed by the names in the files."""
        if self.kind == "bin":
            return dict(self._bin)
        from safetensors.torch import load_file
        state: dict[str, torch.Tensor] = {}
        for path in self.files:
            with _readable(path, "a safetensors file"):
                state.update(load_file(str(path)))
        return state


def _weight_files(directory: Path) -> tuple[list[Path], str]:
    """The files holding the weights: the shards an index names, or model.safetensors, or
    pytorch_model.bin; and their kind ("safetensors" or "bin")."""
    for index_name, kind in _INDEXES.items():
        index = directory / index_name
        if index.is_file():
            return [_shard(directory, name, index) for name in _shard_names(index)], kind
    for name, kind in ((_SAFETENSORS, "safetensors"), (_BIN, "bin")):
        if (directory / name).is_file():
            return [directory / name], kind
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, a sharded "
                            f"model.safetensors.index.json, or pytorch_model.bin")


def _shard_names(index: Path) -> list[str]:
    raw = _read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} must be a JSON object with a non-empty \"weight_map\" object "
                         f"(tensor name -> shard file), got {type(weight_map if isinstance(raw, dict) else raw).__name__}")
    names = set()
    for name in weight_map.values():
        if not isinstance(name, str):
            raise ValueError(f"{index}: the weight_map's values must be shard file names, got {name!r}")
        names.add(name)
    return sorted(names)


def _shard(directory: Path, name: Any, index: Path) -> Path:
    path = child_path(directory, name, source=index)
    if not path.is_file():
        raise ValueError(f"{index} names the shard {name!r}, which is missing from {directory}")
    return path


@contextlib.contextmanager
def _readable(path: Path, what: str):
    """Turns any failure to read `path` into a ValueError naming it (a truncated or corrupt file
    raises the format library's own error, which does not say which file)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (whatever the library raises for a bad file)
        raise ValueError(f"{path} cannot be read as {what} ({type(err).__name__}: {_gist(err)})") from None


def _gist(err: Exception) -> str:
    """The first line of an error's message, and the line that names the reason when torch's
    weights-only unpickler refused something (without the terminal's color codes)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
    reason = [line for line in lines[1:] if "WeightsUnpickler error" in line]
    return " ".join(lines[:1] + reason[:1])


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's state dict, unpickled with weights_only=True only."""
    with _readable(path, "a weights-only PyTorch file"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format: no mmap
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}.get(
        dtype, str(dtype))


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's weights (sharded or not), keyed by the names in the files."""
    return _Weights(Path(directory)).tensors()


# ---- loading ---------------------------------------------------------------------------------

def load_pretrained(cls: type[Model], name_or_path: str | Path, device=None, dtype=None) -> Model:
    """`cls(config, device=device, dtype=dtype)` with the weights of a checkpoint directory (any
    of the three formats) or of a hub id in the local Hugging Face cache, in eval mode. The
    config is checked against the weights' shapes before anything of the model's size is
    allocated."""
    directory = resolve_directory(name_or_path)
    config, fmt = read_config(directory)
    weights = _Weights(directory)
    transformers_hybrid = fmt == "hf" and config.is_hybrid  # Jamba / Bamba: names and layout converted
    shapes = weights.shapes
    if transformers_hybrid:  # the converted shapes, from tensors without data
        meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
        shapes = {k: tuple(v.shape) for k, v in from_transformers(meta).items()}
    _check_config_against_weights(cls, config, fmt, directory, shapes)
    state = _keys_from_hf(weights.tensors())
    if transformers_hybrid:
        state = from_transformers(state)
    if config.tie_embeddings:
        _check_tied_head(state, f"{directory / _CONFIG} ties lm_head to the embedding "
                                f"({_field_name('tie_embeddings', fmt, config.layer)}=true), but")
    model = cls(config, device=device, dtype=dtype)
    load_state_dict_strict(model, state, source=str(directory))
    return model.eval()  # as transformers' from_pretrained: dropout-free inference until .train()


def _check_config_against_weights(cls, config: MambaConfig, fmt: str, directory: Path,
                                  shapes: dict[str, tuple[int, ...]]) -> None:
    """A ValueError naming config.json, its fields and the tensors when the model that the
    config describes does not have the weights' keys and shapes. The model is built on the meta
    device (no memory), after its layer count has been checked against the weights'."""
    path = directory / _CONFIG
    layers = {int(m.group(1)) for m in map(re.compile(r"backbone\.layers\.(\d+)\.").match, shapes) if m}
    n_layer = max(layers) + 1 if layers else 0
    if n_layer != config.n_layer:
        raise ValueError(f"{path}: {_field_name('n_layer', fmt, config.layer)}={config.n_layer}, but the weights in "
                         f"{directory} hold {n_layer} layers")
    expected = {k: tuple(v.shape) for k, v in cls(config, device="meta").state_dict().items()}
    problems = _mismatches(expected, shapes, config.tie_embeddings, "config",
                           hint=lambda k: _shaped_by(k, fmt, config.layer, config))
    if problems:
        raise ValueError(f"{path} does not match the weights in {directory}: " + "; ".join(problems))


def _mismatches(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], tied: bool, what: str,
                hint: Callable[[str], str] = lambda key: "") -> list[str]:
    """Every missing key, unexpected key and shape mismatch of `found` against `expected`,
    as message parts. With tied embeddings, lm_head.weight may be absent from `found`."""
    wanted = {k for k in expected if not (tied and k == "lm_head.weight")}
    found_keys = set(found) - ({"lm_head.weight"} if tied else set())
    missing = sorted(wanted - found_keys)
    unexpected = sorted(found_keys - wanted)
    shapes = sorted(f"{k}: checkpoint {tuple(found[k])} vs {what} {tuple(expected[k])}{hint(k)}"
                    for k in wanted & found_keys if tuple(found[k]) != tuple(expected[k]))
    parts = [f"{len(missing)} missing keys: {_first(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys: {_first(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} shape mismatches: {_first(shapes)}"] if shapes else []
    return parts


def _first(items: list[str], limit: int = 12) -> str:
    """The list as text, its first `limit` items only (every layer may repeat the same problem)."""
    return str(items) if len(items) <= limit else f"{items[:limit]} and {len(items) - limit} more"


# which config fields give a tensor its shape, by the end of its name
_SHAPED_BY = {
    "embedding.weight": ("vocab_size", "d_model"), "lm_head.weight": ("vocab_size", "d_model"),
    "in_proj.weight": ("d_model", "expand"), "in_proj.bias": ("d_model", "expand"),
    "conv1d.weight": ("d_model", "expand", "d_conv"), "conv1d.bias": ("d_model", "expand"),
    "x_proj.weight": ("d_model", "expand", "dt_rank", "d_state"), "dt_proj.weight": ("d_model", "expand", "dt_rank"),
    "dt_proj.bias": ("d_model", "expand"), "A_log": ("d_model", "expand", "d_state"), "D": ("d_model", "expand"),
    "out_proj.weight": ("d_model", "expand"), "out_proj.bias": ("d_model",), "norm.weight": ("d_model",),
    "norm.bias": ("d_model",), "norm_f.weight": ("d_model",), "norm_f.bias": ("d_model",),
}
# the same for Mamba-2's mixer: in_proj makes z, x (d_inner each), B, C (ngroups * d_state each)
# and dt (one per head of headdim channels); the conv runs over x, B and C
_XBC = ("d_model", "expand", "ngroups", "d_state")
_SHAPED_BY_MAMBA2 = {
    "embedding.weight": ("vocab_size", "d_model"), "lm_head.weight": ("vocab_size", "d_model"),
    "in_proj.weight": (*_XBC, "headdim"), "in_proj.bias": (*_XBC, "headdim"),
    "conv1d.weight": (*_XBC, "d_conv"), "conv1d.bias": _XBC,
    "dt_bias": ("d_model", "expand", "headdim"), "A_log": ("d_model", "expand", "headdim"),
    "D": ("d_model", "expand", "headdim"), "mixer.norm.weight": ("d_model", "expand"),
    "out_proj.weight": ("d_model", "expand"), "out_proj.bias": ("d_model",), "norm.weight": ("d_model",),
    "norm.bias": ("d_model",), "norm_f.weight": ("d_model",), "norm_f.bias": ("d_model",),
}


def _shaped_by(key: str, fmt: str, layer: str = "mamba", config: MambaConfig | None = None) -> str:
    hybrid = _shaped_by_hybrid(key, config)
    if hybrid:
        return hybrid
    for end, fields in (_SHAPED_BY_MAMBA2 if layer == "mamba2" else _SHAPED_BY).items():
        if key.endswith("." + end) or key == end:
            return f" (config fields {', '.join(_field_name(f, fmt, layer) for f in fields)})"
    return ""


def _shaped_by_hybrid(key: str, config: MambaConfig | None) -> str:
    """The config fields that shape a hybrid's own tensors: an attention layer's mixer, a
    block's norm2 and MLP; "" for any other key."""
    match = re.match(r"backbone\.layers\.(\d+)\.(mixer|norm2|mlp)\.", key)
    if config is None or match is None:
        return ""
    if match.group(2) == "mixer" and int(match.group(1)) in config.attn_layer_idx:
        return " (config fields d_model, attn_cfg: num_heads, num_heads_kv, head_dim, d_conv)"
    if match.group(2) != "mixer":
        return " (config fields d_model, d_intermediate, num_experts)"
    return ""


def _field_name(field: str, fmt: str, layer: str = "mamba") -> str:
    """A MambaConfig field's name in the config.json of a format, for a model of `layer`."""
    names = {"hf": HF2_NAMES, "official": OFFICIAL2_NAMES} if layer == "mamba2" else \
        {"hf": HF_NAMES, "official": OFFICIAL_NAMES}
    return names.get(fmt, {}).get(field, field)


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads `state` into `model`, or raises ValueError listing every missing key, unexpected
    key and shape mismatch. A tied lm_head may be absent from `state`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.config.tie_embeddings
    state = dict(state)
    if tied:
        _check_tied_head(state, f"{source}: the config ties lm_head to the embedding (tie_embeddings=True), but")
        state.pop("lm_head.weight", None)
    problems = _mismatches(expected, {k: tuple(v.shape) for k, v in state.items()}, tied, "model")
    if problems:
        raise ValueError(f"{source} does not match the model config: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)  # the tied lm_head follows the embedding


def _check_tied_head(state: dict[str, torch.Tensor], context: str) -> None:
    """With tied embeddings, an lm_head.weight in the checkpoint must equal the embedding."""
    head, emb = state.get("lm_head.weight"), state.get("backbone.embedding.weight")
    if head is not None and emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
        raise ValueError(f"{context} lm_head.weight differs from the embedding")


# ---- saving ----------------------------------------------------------------------------------

def save_pretrained(model: nn.Module, directory: str | Path, format: str = "mambakit",
                    max_shard_size: int | str | None = None) -> None:
    """Writes `model` (its `.config` is a MambaConfig) to `directory` in one of FORMATS, as a
    whole: a kill at any instant leaves the complete old checkpoint or the complete new one
    (files.write_directory). Other files in the directory (a tokenizer, a README) are kept.
    max_shard_size (bytes, or a string such as "500MB", "5GB", "2GiB"; None: 5GB) splits the
    safetensors of the "mambakit" and "hf" formats into shards with an index; the "official"
    format is one pytorch_model.bin and takes no max_shard_size."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "official" and max_shard_size is not None:
        raise ValueError(f"max_shard_size is not available for format='official': mamba_ssm's MambaLMHeadModel."
                         f"from_pretrained reads one {_BIN} only (got max_shard_size={max_shard_size!r})")
    shard_limit = _shard_size_bytes(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    config: MambaConfig = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if format == "official":
        raw = config.to_official()  # before writing anything: it raises for an inexpressible config
    else:
        if config.tie_embeddings:
            state.pop("lm_head.weight")
        if format == "hf":
            raw = config.to_hf()  # before writing anything: it raises for an inexpressible config
            state = to_transformers(state, config) if config.is_hybrid else _keys_to_hf(state)
        else:
            raw = {"format": "mambakit", "mambakit_version": _package_version(), **config.to_dict()}

    def write(into: Path) -> None:
        if format == "official":
            atomic_write(into / _BIN, lambda tmp: torch.save(state, tmp))
        else:
            _write_safetensors(into, state, shard_limit)
        atomic_write_json(into / _CONFIG, raw)  # last: a directory with config.json is complete

    write_directory(directory, write, owned=_checkpoint_files, marker=_CONFIG)


def _shard_size_bytes(max_shard_size: Any) -> int:
    """max_shard_size in bytes: an int, or a number with a unit, B, KB, MB, GB, TB (powers of
    1000) or KiB, MiB, GiB, TiB (powers of 1024), in any case ("500MB", "5GB", "1.5 GiB")."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    else:
        size = _size_with_unit(max_shard_size)
        if size is None:
            raise ValueError(f"max_shard_size must be a number of bytes (an int) or a size with a unit such as "
                             f"'500MB' or '5GB' (units {', '.join(u.upper() for u in _SIZE_UNITS)}), "
                             f"got {str(max_shard_size)[:60]!r}")
    if size < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {max_shard_size!r}")
    return size


def _size_with_unit(text: Any) -> int | None:
    """"500MB" -> 500_000_000; None for anything else than a number followed by a known unit."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*", text) if isinstance(text, str) else None
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    return None if unit is None else int(float(match.group(1)) * unit)


def _write_safetensors(into: Path, state: dict[str, torch.Tensor], limit: int) -> None:
    """model.safetensors, or, when the weights exceed `limit` bytes, the shards and their index
    (the index after the shards). A failure removes what this call wrote."""
    from safetensors.torch import save_file
    shards = _split(state, limit)
    names = [_SAFETENSORS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written: list[Path] = []
    try:
        for name, shard in zip(names, shards):
            written.append(into / name)
            atomic_write(into / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
        if len(shards) > 1:
            written.append(into / _SAFETENSORS_INDEX)
            atomic_write_json(into / _SAFETENSORS_INDEX, {
                "metadata": {"total_size": sum(_nbytes(t) for t in state.values())},
                "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}})
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _split(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into consecutive shards of at most `limit` bytes each (as
    transformers and huggingface_hub cut them); a tensor larger than `limit` is a shard alone."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        if shards[-1] and size + _nbytes(tensor) > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += _nbytes(tensor)
    return shards


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _checkpoint_files(directory: Path) -> set[str]:
    """The names of a checkpoint's files in `directory`, present or not: config.json, every
    weight file, the shards its indexes name (only plain names inside the directory: a name
    pointing elsewhere is not the checkpoint's to remove), and every file named as
    save_pretrained names its shards (`model-00001-of-00003.safetensors`), indexed or not."""
    names = {_CONFIG, *_WEIGHT_FILES}
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):  # a shard, or the temporary file of a killed shard write
            shard = re.sub(r"^\.(.*)\.[a-z0-9_]{8}\.tmp$", r"\1", name)
            if _SHARD_NAME.fullmatch(shard):
                names.add(shard)
    for index in _INDEXES:
        try:
            shards = _shard_names(directory / index) if (directory / index).is_file() else []
        except ValueError:
            continue
        for shard in shards:
            with contextlib.suppress(ValueError):
                names.add(child_path(directory, shard, source=directory / index).name)
    return names


def _package_version() -> str:
    """The installed mambakit's version from the package metadata ("0+unknown" when mambakit
    runs from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("mambakit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
