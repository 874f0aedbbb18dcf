"""A small training loop shared by the task trainers (synthetic tasks, digits): AdamW with
the LM trainer's parameter groups and warmup + cosine schedule (mambakit.training.optim),
gradient clipping, periodic evaluation, and a tqdm bar. Batches come from a function of the
step, so a run is a pure function of its seed."""

from __future__ import annotations

import math
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..training.optim import lr_at, param_groups, warmup_warning  # the LM trainer's schedule and groups


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
    time_limit_s: float | None = None  # stop early (with a last evaluation) once this process has trained this long
    # a resumable state (model, optimizer, step, rows) written atomically to this file every
    # save_every steps (0: only at the end and on an early stop); resume=True continues from it
    state_path: str | None = None
    save_every: int = 0
    resume: bool = False
    # the caller's other settings that decide the batches and the model (a task trainer's flags):
    # stored with the state, and a resume must match them too
    settings: dict | None = None

    # what a resumed run must share with the one that wrote the state, for the same schedule
    SCHEDULE_FIELDS = ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "seed")

    def check(self) -> None:
        for name in ("max_steps", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be an int >= 0, got {self.warmup_steps!r}")
        for name in ("grad_clip", "weight_decay"):  # NaN would train a NaN model
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.time_limit_s is not None and not (isinstance(self.time_limit_s, (int, float))
                                                  and not isinstance(self.time_limit_s, bool)
                                                  and self.time_limit_s > 0):
            raise ValueError(f"time_limit_s must be a number > 0 or None, got {self.time_limit_s!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"--save-every must be an int >= 0, got {self.save_every!r}")
        if self.resume and not self.state_path:
            raise ValueError("--resume needs a state to resume from: give --out-dir")


def fit(model: nn.Module, batch_at: Callable[[int], tuple], loss_fn: Callable[..., torch.Tensor], cfg: FitConfig,
        evaluate: Callable[[], dict] | None = None, progress: bool = True,
        autocast: Callable | None = None) -> list[dict]:
    """Trains `model` for cfg.max_steps steps: loss_fn(model, *batch_at(step)) is minimised.
    Every cfg.eval_every steps (and at the end) `evaluate()` adds its metrics to the row.
    Returns one row per step: step, loss, lr, seconds (+ the evaluation's keys). With
    cfg.time_limit_s, training stops after the step that crosses the limit (evaluated, and
    marked "stopped_early": True); the schedule is still that of cfg.max_steps. With
    cfg.state_path the state is saved (see FitConfig) and cfg.resume continues it: the
    parameters and losses are those of an uninterrupted run, and only the rows where a call
    stopped carry the extra evaluation and mark. A warmup longer than the run is warned about
    on stderr."""
    cfg.check()
    warning = warmup_warning(cfg)
    if warning is not None:
        print(warning, file=sys.stderr)
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=fused or None)
    rows: list[dict] = []
    unread: list[dict] = []  # rows whose loss is still a device tensor
    first, seconds_before = 0, 0.0
    if cfg.resume:
        first, rows = load_state(cfg, model, optimizer)
        seconds_before = rows[-1]["seconds"] if rows else 0.0
    elif cfg.state_path and Path(cfg.state_path).exists():
        raise ValueError(f"{cfg.state_path} already holds a training state; pass --resume to continue it "
                         f"or choose another --out-dir")
    bar = _bar(cfg.max_steps, progress)
    bar.update(first)
    start = time.perf_counter()
    model.train()
    for step in range(first, cfg.max_steps):
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
        elapsed = time.perf_counter() - start
        # the loss stays on the device until a flush below: reading it every step would make
        # the host wait for the GPU, and a small model's loop is bound by the host's time
        row = {"step": step + 1, "loss": loss.detach(), "lr": lr, "seconds": seconds_before + elapsed}
        rows.append(row)
        unread.append(row)
        out_of_time = cfg.time_limit_s is not None and elapsed >= cfg.time_limit_s and step + 1 < cfg.max_steps
        if out_of_time:
            row["stopped_early"] = True
        last = step + 1 == cfg.max_steps or out_of_time
        evaluating = evaluate is not None and ((step + 1) % cfg.eval_every == 0 or last)
        saving = cfg.state_path and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0))
        if evaluating or saving or len(unread) >= READ_LOSSES_EVERY:
            _read_losses(unread)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if evaluating:
            model.eval()
            with torch.no_grad():
                row.update(evaluate())
            model.train()
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k not in ("step", "lr", "seconds", "stopped_early")})
        if saving:
            save_state(cfg, model, optimizer, rows)
        bar.update(1)
        if out_of_time:
            break
    _read_losses(unread)
    bar.close()
    return rows


READ_LOSSES_EVERY = 100  # steps between reads of the losses from the device


def _read_losses(rows: list[dict]) -> None:
    """Replaces the rows' loss tensors by floats, with one device-to-host copy, and empties the list."""
    if rows:
        for row, value in zip(rows, torch.stack([r["loss"] for r in rows]).float().tolist()):
            row["loss"] = value
        rows.clear()


def save_state(cfg: FitConfig, model: nn.Module, optimizer, rows: list[dict]) -> None:
    """Everything a resumed run needs, written atomically (a temporary file, then a rename):
    the batches and the schedule are functions of the step, so these make the resume exact."""
    state = {"step": rows[-1]["step"], "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rows": rows, "schedule": _settings(cfg)}
    atomic_write(cfg.state_path, lambda tmp: torch.save(state, tmp))


def _settings(cfg: FitConfig) -> dict:
    """What a resumed run must share with the one that wrote the state: the schedule's fields
    and the caller's settings."""
    return {**{f: getattr(cfg, f) for f in cfg.SCHEDULE_FIELDS}, **(cfg.settings or {})}


def load_state(cfg: FitConfig, model: nn.Module, optimizer) -> tuple[int, list[dict]]:
    """Loads cfg.state_path into the model and optimizer; returns (the step to continue from,
    the rows so far). A missing or unreadable state, another model or another schedule is a
    ValueError that names it."""
    path = Path(cfg.state_path)
    if not path.is_file():
        raise ValueError(f"--resume: there is no training state at {path}")
    try:  # weights_only: tensors and plain containers only, a crafted file runs no code
        state = torch.load(path, map_location="cpu", weights_only=True)
        schedule, step, rows = state["schedule"], int(state["step"]), list(state["rows"])
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # garbage, not a crafted object
            raise ValueError(f"the training state {path} cannot be read (UnpicklingError)") from None
        raise ValueError(f"the training state {path} holds objects other than tensors and plain data; "
                         f"it is not loaded (torch.load(weights_only=True) refuses it)") from None
    except Exception as err:  # noqa: BLE001 (any corruption is reported the same way)
        raise ValueError(f"the training state {path} cannot be read ({type(err).__name__}: {err})") from None
    now = _settings(cfg)
    differ = [f"{f} {schedule.get(f)!r} -> {now.get(f)!r}" for f in sorted(set(schedule) | set(now))
              if schedule.get(f) != now.get(f)]
    if differ:
        raise ValueError(f"--resume: {path} was written with other settings ({', '.join(differ)}); "
                         f"a resumed run must keep them to continue the same schedule")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"--resume: {path} holds another model ({str(err).splitlines()[0]})") from None
    optimizer.load_state_dict(state["optimizer"])
    return step, rows


def _bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)
