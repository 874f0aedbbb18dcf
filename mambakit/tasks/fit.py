"""A small training loop shared by the task trainers (synthetic tasks, digits): AdamW with
the LM trainer's parameter groups and warmup + cosine schedule, gradient clipping, periodic
evaluation, and a tqdm bar. Batches come from a function of the step, so a run is a pure
function of its seed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class FitConfig:
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0
    time_limit_s: float | None = None  # stop early (with a last evaluation) once training has run this long

    def check(self) -> None:
        for name in ("max_steps", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--warmup-steps, --grad-clip and --weight-decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.time_limit_s is not None and not (isinstance(self.time_limit_s, (int, float))
                                                  and not isinstance(self.time_limit_s, bool)
                                                  and self.time_limit_s > 0):
            raise ValueError(f"time_limit_s must be a number > 0 or None, got {self.time_limit_s!r}")


def fit(model: nn.Module, batch_at: Callable[[int], tuple], loss_fn: Callable[..., torch.Tensor], cfg: FitConfig,
        evaluate: Callable[[], dict] | None = None, progress: bool = True,
        autocast: Callable | None = None) -> list[dict]:
    """Trains `model` for cfg.max_steps steps: loss_fn(model, *batch_at(step)) is minimised.
    Every cfg.eval_every steps (and at the end) `evaluate()` adds its metrics to the row.
    Returns one row per step: step, loss, lr, seconds (+ the evaluation's keys). With
    cfg.time_limit_s, training stops after the step that crosses the limit (evaluated, and
    marked "stopped_early": True); the schedule is still that of cfg.max_steps."""
    from ..train import lr_at, param_groups  # the LM trainer's schedule and weight-decay groups
    cfg.check()
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=fused or None)
    rows: list[dict] = []
    bar = _bar(cfg.max_steps, progress)
    start = time.perf_counter()
    model.train()
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_at(step)
        if autocast is not None:
            with autocast():
                loss = loss_fn(model, *batch)
        else:
            loss = loss_fn(model, *batch)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss.item(), "lr": lr, "seconds": time.perf_counter() - start}
        out_of_time = cfg.time_limit_s is not None and row["seconds"] >= cfg.time_limit_s and step + 1 < cfg.max_steps
        if out_of_time:
            row["stopped_early"] = True
        if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps or out_of_time):
            model.eval()
            with torch.no_grad():
                row.update(evaluate())
            model.train()
        rows.append(row)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("step", "lr", "seconds", "stopped_early")})
        if out_of_time:
            break
    bar.close()
    return rows


def _bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)
