"""TrainConfig: every setting of `mambakit train` (one --flag per field), and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import PRESETS


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
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    max_corpus_bytes: int | None = None
    chunk_len: int | None = None  # run each sequence in chunks, states carried (exact gradient, flat memory)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        if self.chunk_len is not None and self.chunk_len < 1:
            raise ValueError(f"--chunk-len must be >= 1, got {self.chunk_len}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {self.stop_after}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--warmup-steps, --grad-clip and --weight-decay must be >= 0")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")
