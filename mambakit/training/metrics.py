"""A run's metrics: one JSON row per step in out_dir/metrics.jsonl (loss, lr, tokens/s, and
the validation loss at evaluations, in nats), and the loss curves they plot to out_dir/loss.png
(in bits per token, as the run's summary)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metrics of a run being resumed, without the steps after its checkpoint. A torn last line
    (a run killed while writing it) is dropped with a warning; any other unreadable line is a
    ValueError naming the file and the line."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows = []
    for n, (number, line) in enumerate(numbered):
        row = _row(line)
        if row is None and n == len(numbered) - 1:
            print(f"[mambakit] warning: {path} line {number} is torn (a run killed while writing it); dropped",
                  file=sys.stderr)
            break
        if row is None:
            raise ValueError(f"{path} line {number} is not a metrics row (JSON with an integer \"step\"): "
                             f"{line[:80]!r}")
        rows.append(row)
    return [r for r in rows if r["step"] <= up_to_step]


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
    return row if ok else None


def plot_losses(rows: list[dict], path: Path):
    """The training loss of every step and the validation loss of every evaluation, against the
    step, in bits per token (the unit of the run's summary; the rows hold nats). Returns the
    matplotlib Figure it saved."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    train = [(r["step"], r["loss"] / math.log(2)) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"] / math.log(2)) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (bits / token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
