"""LMCache: the whole recurrent state of a language model between tokens (one MambaState per
Mamba layer, one AttentionState, a pre-allocated KV cache, per attention layer of a hybrid, and
the logits for the next token), and its file format for saving a conversation and continuing
it later.

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
from ..modules import AttentionState, MambaState

FORMAT = "mambakit-cache"
# the model config fields that decide what a recurrent state means (not how the weights were
# initialised); the value is read from the attribute on the right, so that equal models written
# differently (dt_rank "auto" or its value, vocab_size 50277 or 50280 padded) compare equal
ARCHITECTURE_FIELDS = {
    "d_model": "d_model", "n_layer": "n_layer", "vocab_size": "padded_vocab_size", "d_state": "d_state",
    "d_conv": "d_conv", "expand": "expand", "dt_rank": "resolved_dt_rank", "layer": "layer", "gate": "gate",
    "conv_bias": "conv_bias", "bias": "bias", "rms_norm": "rms_norm", "norm_epsilon": "norm_epsilon",
    "residual_in_fp32": "residual_in_fp32", "headdim": "headdim", "ngroups": "ngroups",
    "layer_pattern": "layer_pattern", "d_intermediate": "d_intermediate", "num_experts": "num_experts",
    "inner_norms": "inner_norms",
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
    """The whole state of a MambaLM between tokens: one MambaState per Mamba layer, one
    AttentionState per attention layer, and the logits for the next token. A pure Mamba model's
    state does not depend on how many tokens it has seen (`seqlen`), so a whole conversation's
    state fits in a few MB and can be saved, loaded and continued exactly; an attention layer's
    KV cache grows with the conversation (up to its window, with one).

    nbytes(): every Mamba layer's conv (B, D_inner or conv_dim, K-1) and SSM state ((B, D_inner,
    N) fp32, or (B, H, P, N)), every attention layer's keys and values (2 · B · Hkv · T · head_dim
    in the model's dtype, T the slots allocated), lengths (B int64) and conv state, and the logits."""
    layers: list
    seqlen: int = 0
    last_logits: torch.Tensor | None = None  # (B, V) after prefill / each step
    architecture: dict | None = None  # architecture_of(the config of the model that made it), if known

    @property
    def batch_size(self) -> int:
        return _batch_of(self.layers[0])

    def nbytes(self) -> int:
        extra = 0 if self.last_logits is None else self.last_logits.nbytes
        return sum(_state_nbytes(s) for s in self.layers) + extra

    def reserve(self, positions: int) -> None:
        """Room for `positions` positions in every attention layer's KV cache (the window's at
        most): the slots grow, keeping what they hold. generate calls it before decoding, so
        that the decoding step runs on fixed buffers (a CUDA graph replays it)."""
        for state in self.layers:
            if isinstance(state, AttentionState):
                state.reserve(positions)

    def copy_from_(self, other: "LMCache") -> None:
        """Every state of `other` (the same layout) copied into this cache's tensors in place."""
        for mine, theirs in zip(self.layers, other.layers):
            if isinstance(mine, AttentionState):
                mine.copy_(theirs)
            else:
                mine.conv.copy_(theirs.conv)
                mine.ssm.copy_(theirs.ssm)

    def check_fits(self, model) -> None:
        """A ValueError saying what differs unless this cache can continue `model`: the same
        layer count, the same architecture (when the cache knows it), every state of the shape
        and dtype that model.allocate_cache gives at this batch (an attention layer's KV cache
        may hold any number of slots), on the model's device, and next-token logits (B, >=
        vocab_size). A TypeError if it is not a cache of tensors."""
        check_states(self)
        expected = model.allocate_cache(self.batch_size, device="meta")  # shapes and dtypes, no memory
        if len(self.layers) != len(expected.layers):
            raise ValueError(f"the cache holds {len(self.layers)} layers, the model has {len(expected.layers)}")
        _check_architecture(self.architecture, architecture_of(model.config))
        device = _device_of(model)
        for i, (have, want) in enumerate(zip(self.layers, expected.layers)):
            if isinstance(want, AttentionState):
                _check_attention_state(i, have, want, device)
                continue
            if not isinstance(have, MambaState):
                raise ValueError(f"layer {i} of the cache is an attention layer's KV cache, the model's layer {i} "
                                 f"is a Mamba layer")
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
        layers = [_converted(have, want) for have, want in zip(self.layers, expected)]
        return LMCache(layers + self.layers[len(layers):], self.seqlen, self.last_logits, self.architecture)

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically (a crash leaves the old file or the new one).
        An attention layer's KV cache is saved with the slots that hold something only."""
        from safetensors.torch import save_file
        check_states(self)
        tensors, attention = {}, {}
        for i, state in enumerate(self.layers):
            if isinstance(state, AttentionState):
                held = min(state.capacity, int(state.lengths.max()) if state.lengths.numel() else 0)
                tensors[f"layers.{i}.k"] = state.k[:, :, :held].contiguous()
                tensors[f"layers.{i}.v"] = state.v[:, :, :held].contiguous()
                tensors[f"layers.{i}.lengths"] = state.lengths.contiguous()
                if state.conv is not None:
                    tensors[f"layers.{i}.conv"] = state.conv.contiguous()
                attention[str(i)] = {"window": state.window}
                continue
            tensors[f"layers.{i}.conv"] = state.conv.contiguous()
            tensors[f"layers.{i}.ssm"] = state.ssm.contiguous()
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits.contiguous()
        meta = {"format": FORMAT, "seqlen": str(self.seqlen), "n_layer": str(len(self.layers))}
        if attention:
            meta["attention"] = json.dumps(attention, sort_keys=True)
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


def _batch_of(state) -> int:
    return state.k.shape[0] if isinstance(state, AttentionState) else state.ssm.shape[0]


def _state_nbytes(state) -> int:
    if isinstance(state, AttentionState):
        return state.nbytes()
    return state.conv.nbytes + state.ssm.nbytes


def _converted(have, want):
    """`have` in the dtypes of `want` (the model's), when both are states of the same kind."""
    if isinstance(want, AttentionState) and isinstance(have, AttentionState):
        conv = None if have.conv is None or want.conv is None else have.conv.to(want.conv.dtype)
        return AttentionState(have.k.to(want.k.dtype), have.v.to(want.v.dtype), have.lengths, conv, have.window,
                              have.filled)
    if isinstance(want, MambaState) and isinstance(have, MambaState):
        return MambaState(have.conv.to(want.conv.dtype), have.ssm.to(want.ssm.dtype))
    return have  # check_fits says what differs


def check_states(cache: LMCache) -> None:
    """A TypeError / ValueError unless the cache is a non-empty list of states of one batch B:
    MambaStates of floating tensors conv (B, D, K-1) and ssm (B, D, N) that agree on D (or
    Mamba-2's ssm (B, H, P, N)), and
    AttentionStates of floating k and v (B, Hkv, T, head_dim), int64 lengths (B,) and a conv
    state (B, C, K-1) or None; with an int seqlen >= 0 and next-token logits (B, V) or None.
    What a cache holds on its own, whatever the model."""
    if not isinstance(cache, LMCache):
        raise TypeError(f"cache must be an LMCache (from model.prefill, model.allocate_cache or LMCache.load), "
                        f"got {type(cache).__name__}")
    if not isinstance(cache.layers, (list, tuple)) or not cache.layers:
        raise ValueError("the cache holds no layers")
    batch = None
    for i, state in enumerate(cache.layers):
        if isinstance(state, AttentionState):
            _check_kv(i, state)
        elif isinstance(state, MambaState):
            for part in ("conv", "ssm"):
                _require_float(f"layer {i}'s {part} state", getattr(state, part), (3,) if part == "conv" else (3, 4))
            # Mamba-1's ssm (B, D, N) has the conv's channels; Mamba-2's (B, H, P, N) its batch only
            agree = 2 if state.ssm.ndim == 3 else 1
            if state.ssm.shape[:agree] != state.conv.shape[:agree]:
                raise ValueError(f"layer {i}'s states conv {tuple(state.conv.shape)} and ssm {tuple(state.ssm.shape)} "
                                 f"disagree on {'(batch, channels)' if agree == 2 else 'the batch'}")
        else:
            raise TypeError(f"the cache's layer {i} must be a MambaState or an AttentionState, "
                            f"got {type(state).__name__}")
        batch = _batch_of(state) if batch is None else batch
        if _batch_of(state) != batch:
            raise ValueError(f"layer {i}'s states have batch {_batch_of(state)}, which disagrees with layer 0's "
                             f"batch {batch}")
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


def _check_kv(i: int, state: AttentionState) -> None:
    """An attention layer's KV cache on its own: k and v of one shape (B, Hkv, T, head_dim),
    lengths (B,) int64, a conv state (B, C, K-1) or None, a window None or >= 1."""
    _require_float(f"layer {i}'s keys", state.k, (4,))
    _require_float(f"layer {i}'s values", state.v, (4,))
    if state.k.shape != state.v.shape:
        raise ValueError(f"layer {i}'s keys {tuple(state.k.shape)} and values {tuple(state.v.shape)} differ in shape")
    lengths = state.lengths
    if (not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int64
            or tuple(lengths.shape) != tuple(state.k.shape[:1])):
        raise ValueError(f"layer {i}'s lengths must be an int64 tensor of shape ({state.k.shape[0]},), got "
                         f"{_describe(lengths)} of shape {tuple(getattr(lengths, 'shape', ()))}")
    if state.conv is not None:
        _require_float(f"layer {i}'s conv state", state.conv, (3,))
    window = state.window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"layer {i}'s window must be None or an int >= 1, got {window!r:.40}")


def _check_attention_state(i: int, have, want: AttentionState, device) -> None:
    """`have` fits the model's attention layer i (`want`, its empty cache on the meta device)."""
    if not isinstance(have, AttentionState):
        raise ValueError(f"layer {i} of the cache is a Mamba layer's state, the model's layer {i} is an attention "
                         f"layer")
    for part in ("k", "v"):
        got, need = getattr(have, part), getattr(want, part)
        if (got.shape[0], got.shape[1], got.shape[3]) != (need.shape[0], need.shape[1], need.shape[3]):
            raise ValueError(f"layer {i}'s {'keys' if part == 'k' else 'values'} have shape {tuple(got.shape)}, the "
                             f"model needs (batch {need.shape[0]}, {need.shape[1]} heads, T, head_dim {need.shape[3]})")
        _check_dtype_and_device(f"layer {i}'s {part} cache", got, need.dtype, device)
    if (have.conv is None) != (want.conv is None):
        raise ValueError(f"layer {i}'s KV cache {'has' if have.conv is not None else 'lacks'} a conv state; the "
                         f"model's attention layer {'has none' if want.conv is None else 'has one'}")
    if have.conv is not None:
        _check_state_tensor(f"layer {i}'s conv state", have.conv, want.conv, device)
    if have.window != want.window:
        raise ValueError(f"layer {i}'s KV cache has window {have.window}, the model's attention layer {want.window}")
    if have.window is not None and have.capacity > have.window:
        raise ValueError(f"layer {i}'s KV cache holds {have.capacity} slots, more than its window {have.window}")


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
    _check_dtype_and_device(name, have, want.dtype, device)


def _check_dtype_and_device(name: str, have: torch.Tensor, dtype: torch.dtype, device) -> None:
    if have.dtype != dtype:
        raise ValueError(f"{name} is {have.dtype}, the model keeps it in {dtype} "
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
            attention = _meta_attention(meta, n_layer)
            keys = set(f.keys())
            if len(keys) < 2 * n_layer:
                raise ValueError(f"the metadata says n_layer={n_layer} ({2 * n_layer} state tensors) "
                                 f"but the file holds {len(keys)} tensors")
            layers = []
            for i in range(n_layer):
                names = ("k", "v", "lengths") if i in attention else ("conv", "ssm")
                missing = [f"layers.{i}.{k}" for k in names if f"layers.{i}.{k}" not in keys]
                if missing:
                    raise ValueError(f"the metadata says n_layer={n_layer} but the file has no tensor {missing[0]}")
                if i in attention:
                    layers.append(_read_kv(f, i, keys, attention[i]))
                else:
                    layers.append(MambaState(f.get_tensor(f"layers.{i}.conv"), f.get_tensor(f"layers.{i}.ssm")))
            logits = f.get_tensor("last_logits") if "last_logits" in keys else None
    except SafetensorError as err:
        raise ValueError(f"not a readable cache file (empty, truncated or not safetensors): {err}") from None
    return LMCache(layers, seqlen, logits, _meta_architecture(meta))


def _read_kv(f, i: int, keys: set[str], window: int | None) -> AttentionState:
    """Attention layer i's KV cache from an open cache file: the saved slots (those that held
    something), room for more added as it is used."""
    lengths = f.get_tensor(f"layers.{i}.lengths")
    conv = f.get_tensor(f"layers.{i}.conv") if f"layers.{i}.conv" in keys else None
    if lengths.dtype != torch.int64 or lengths.ndim != 1:
        raise ValueError(f"layer {i}'s lengths must be a 1-D int64 tensor, got {lengths.dtype} of shape "
                         f"{tuple(lengths.shape)}")
    state = AttentionState(f.get_tensor(f"layers.{i}.k"), f.get_tensor(f"layers.{i}.v"), lengths, conv, window)
    if lengths.numel():  # state.filled: lengths.max(), read when the state was made
        if int(lengths.min()) < 0 or (state.filled > state.capacity and state.capacity != window):
            raise ValueError(f"layer {i}'s lengths (up to {state.filled}) do not fit its {state.capacity} saved "
                             f"slots")
    return state


def _meta_attention(meta: dict, n_layer: int) -> dict[int, int | None]:
    """The attention layers of the saved metadata: {layer index: its window, or None}."""
    text = meta.get("attention")
    if text is None:
        return {}
    try:
        raw = json.loads(text)
        layers = {int(i): entry["window"] for i, entry in raw.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"the cache metadata's 'attention' must be a JSON object {{layer: {{\"window\": ...}}}}, "
                         f"got {text[:80]!r}") from None
    for i, window in layers.items():
        if not 0 <= i < n_layer or not (window is None or (isinstance(window, int) and not isinstance(window, bool)
                                                           and window >= 1)):
            raise ValueError(f"the cache metadata's 'attention' names layer {i} with window {window!r:.40}")
    return layers


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
