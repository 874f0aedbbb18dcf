"""A run's metrics: one JSON row per step in out_dir/metrics.jsonl (loss, lr, tokens/s, and
the validation loss at evaluations), and the loss curves they plot to out_dir/loss.png."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metrics of a run being resumed, without the steps after its checkpoint."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def plot_losses(rows: list[dict], path: Path) -> None:
    """The training loss of every step and the validation loss of every evaluation, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
