"""TrainConfig: every setting of `mambakit train` (one --flag per field), its checks, and what a
`--resume` may change."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from ..config import PRESETS
from .devices import DEVICES


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str | None = None  # None: the Python standard library's source files
    out_dir: str = "runs/mambakit"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 500
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    max_corpus_bytes: int | None = None  # read at most this many bytes of text (or of a token file), in all
    chunk_len: int | None = None  # run each sequence in chunks, states carried (exact gradient, flat memory)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    resume: bool = False
    overwrite: bool = False
    skip_nonfinite: bool = False  # skip a step whose loss or gradient norm is not finite, instead of stopping
    allow_config_change: bool = False  # --resume with other settings than the checkpoint's (listed, not refused)

    def __post_init__(self):
        for name in ("data", "out_dir"):  # a Path is kept as its string: the config is stored as plain data
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    def check(self) -> None:
        """A ValueError naming the option for any setting out of its range (NaN and inf included)."""
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every"):
            _require(_is_int(getattr(self, name), low=1), name, "an int >= 1", getattr(self, name))
        for name in ("chunk_len", "stop_after", "max_corpus_bytes"):
            v = getattr(self, name)
            _require(v is None or _is_int(v, low=1), name, "an int >= 1", v)
        _require(_is_int(self.warmup_steps, low=0), "warmup_steps", "an int >= 0", self.warmup_steps)
        _require(_is_int(self.seed, low=0), "seed", "an int >= 0", self.seed)
        _require(_is_finite(self.lr) and self.lr > 0, "lr", "a finite number > 0", self.lr)
        _require(_is_finite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]",
                 self.min_lr_ratio)
        _require(_is_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0",
                 self.weight_decay)
        _require(_is_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
                 "a finite number >= 0 (0: no clipping)", self.grad_clip)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _require(_is_finite(v) and 0 <= v < 1, name, "a number in [0, 1)", v)
        _require(isinstance(self.preset, str) and self.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}",
                 self.preset)
        _require(isinstance(self.device, str) and DEVICES.fullmatch(self.device) is not None, "device",
                 "auto, cpu, cuda, cuda:N or mps", self.device)
        _require(_is_path(self.out_dir), "out_dir", "a path", self.out_dir)
        _require(self.data is None or _is_path(self.data), "data", "a path", self.data)
        for field in dataclasses.fields(self):
            if field.type in (bool, "bool"):
                _require(isinstance(getattr(self, field.name), bool), field.name, "True or False",
                         getattr(self, field.name))
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")

    def changes_from(self, stored: dict) -> list[str]:
        """The settings in which this config differs from `stored` (a checkpoint's train_config),
        as "--name old -> new", except those a resume may change (RESUME_MAY_CHANGE). Fields the
        stored config lacks (written by an older version) are not compared."""
        now = dataclasses.asdict(self)
        return [f"--{name.replace('_', '-')} {stored[name]!r} -> {value!r}" for name, value in now.items()
                if name not in RESUME_MAY_CHANGE and name in stored and not _same(name, stored[name], value)]


# What a --resume may change without --allow-config-change: the length of the run (--max-steps,
# to extend it: the schedule then decays to the new end), where it lives, how often it evaluates
# and saves, when this invocation stops, and how it runs (device, compile, activation
# checkpointing, FSDP, chunks: the same gradients). Everything else (data, seed, batch, sequence
# length, optimizer and schedule, preset) decides which batches and which updates come next,
# so changing it is no longer the run the checkpoint continues.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "out_dir", "eval_every", "eval_batches", "save_every", "stop_after", "device", "compile",
    "activation_checkpointing", "fsdp", "chunk_len", "resume", "overwrite", "skip_nonfinite", "allow_config_change",
})


def _same(name: str, old, new) -> bool:
    if name == "data" and old is not None and new is not None:
        return os.path.normpath(os.path.expanduser(str(old))) == os.path.normpath(os.path.expanduser(str(new)))
    return old == new


def _require(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike)) and str(v) != ""
