"""What every task says and writes in the same form: a line at the start (what trains, how big,
on which device; at once, before the first step, which can take long), and at the end one
summary with the same keys for every task (SUMMARY_KEYS, and the task's own after them),
printed as one JSON line on stdout with a readable line on stderr, and written with every
step's row to OUT_DIR/metrics.json as {"summary": ..., "steps": [...]}."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

# the keys that every task's summary has, in this order
SUMMARY_KEYS = ("task", "accuracy", "final_loss", "n_params", "steps", "steps_run", "seconds", "batch_size", "lr",
                "seed", "device", "model", "out_dir")
# tokens (or patch tokens) a run may train on a CPU before the start line says that it is sized for a GPU
CPU_TOKENS = 20_000_000


def announce(task: str, n_params: int, steps: int, batch: str, tokens: int, device: torch.device) -> None:
    """The start line on stderr: `batch` says what one batch is ("64 x 4096 tokens"), `tokens`
    how many tokens the whole run trains on (for the note on GPU-sized runs on a CPU)."""
    note = ""
    if device.type == "cpu" and tokens > CPU_TOKENS:
        note = (f"; {tokens / 1e6:.0f}M tokens is sized for a GPU, on a CPU this takes long (a smaller "
                f"--seq-len, --batch-size or --max-steps shortens it)")
    print(f"[mambakit] {task}: {count(n_params)} parameters, {steps} steps of batch {batch} on {device}{note}",
          file=sys.stderr, flush=True)


def count(n: int) -> str:
    """A number of parameters, short: 44.2K, 1.30M."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def task_summary(task: str, *, accuracy: float | None, rows: list[dict], n_params: int, steps: int,
                 batch_size: int, lr: float, seed: int, device: torch.device, model: dict,
                 out_dir: str | None) -> dict:
    """The keys every task's summary has (SUMMARY_KEYS), from the run's rows (tasks/fit.py)."""
    return {"task": task, "accuracy": accuracy, "final_loss": rows[-1]["loss"] if rows else None,
            "n_params": n_params, "steps": steps, "steps_run": len(rows),
            "seconds": round(rows[-1]["seconds"], 2) if rows else 0.0, "batch_size": batch_size, "lr": lr,
            "seed": seed, "device": str(device), "model": model, "out_dir": out_dir or None}


def print_summary(summary: dict) -> None:
    """The summary as one JSON line on stdout, and a readable line on stderr."""
    print(json.dumps(summary, indent=None, sort_keys=True))
    accuracy = summary.get("accuracy")
    where = f"; model, metrics.json and plots in {summary['out_dir']}" if summary.get("out_dir") else ""
    print(f"[mambakit] {summary['task']}: {count(summary['n_params'])} parameters, {summary['steps_run']} steps "
          f"in {summary['seconds']:.0f} s on {summary['device']}; accuracy "
          f"{'-' if accuracy is None else f'{accuracy:.2%}'}{where}", file=sys.stderr)


def save_run(out_dir: str | Path, model, summary: dict, rows: list[dict], plot_key: str, title: str,
             save_model: Callable[[Path], None] | None = None) -> None:
    """The model (save_model(out_dir), by default model.save_pretrained: config.json +
    model.safetensors), metrics.json (the summary and every step's row) and a training-curve
    plot (loss and `plot_key`) in out_dir."""
    from ..checkpoint import atomic_write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (save_model or model.save_pretrained)(out)
    atomic_write_json(out / "metrics.json", {"summary": summary, "steps": rows})
    plot_curves(rows, plot_key, title, out / "curves.png")


def plot_curves(rows: list[dict], key: str, title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    fig = Figure(figsize=(9, 3.5))
    ax = fig.subplots(1, 2)
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
    ax[0].set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ev = [r for r in rows if key in r]
    ax[1].plot([r["step"] for r in ev], [r[key] for r in ev], marker="o")
    ax[1].set(xlabel="step", ylabel=key, ylim=(0, 1.02), title=key)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
