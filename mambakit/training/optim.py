"""The optimisation recipe shared by every trainer (`mambakit train` and the task trainers in
tasks/fit.py): linear warmup then cosine decay of the learning rate, and AdamW's parameter
groups with no weight decay on norms, biases, A_log, D and the dt bias."""

from __future__ import annotations

import math
from typing import Protocol

from torch import nn


class Schedule(Protocol):
    """What the learning-rate schedule reads from a trainer's config (TrainConfig, FitConfig)."""
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def warmup_warning(cfg: Schedule) -> str | None:
    """A warning when the warmup is longer than the run: the learning rate then never reaches
    cfg.lr (it stops at lr_at(max_steps - 1)); None otherwise."""
    if cfg.warmup_steps <= cfg.max_steps:
        return None
    return (f"[mambakit] warning: --warmup-steps {cfg.warmup_steps} is longer than the run (--max-steps "
            f"{cfg.max_steps}): the learning rate peaks at {lr_at(cfg.max_steps - 1, cfg):.3g}, not --lr {cfg.lr:g}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, conv, embedding) only: none on norms, biases,
    A_log, D and the dt bias (the official recipe marks these `_no_weight_decay`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or name.endswith("A_log"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
