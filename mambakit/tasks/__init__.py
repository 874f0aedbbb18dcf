"""Tasks beyond language modelling on a corpus: `mambakit train --task NAME ...` and
`mambakit eval --task NAME ...` hand the remaining flags to the task's module, which parses
them itself (so `mambakit train --task NAME --help` lists that task's flags).

A task module defines `train_main(argv: list[str]) -> int` and, where it has one, an
`eval_main(argv: list[str]) -> int`. Every task says what it trains before its first step and
ends with the same summary (report.py); its model goes to --out-dir, where `eval` finds it."""

from __future__ import annotations

import importlib

TASKS = {
    "digits": "mambakit.tasks.digits",  # Vision Mamba on scikit-learn's 8x8 digits
    "selective-copying": "mambakit.tasks.selective_copying",  # the Mamba paper's synthetic tasks
    "induction-heads": "mambakit.tasks.induction_heads",
    "dna": "mambakit.tasks.dna.task",  # a DNA language model on FASTA/FASTQ genomes
    "dna-classify": "mambakit.tasks.dna.classify",  # genome windows against k-mer-matched samples
}


def run(command: str, task: str, argv: list[str]) -> int:
    """Runs `command` ("train" or "eval") of `task` with the task's own flags `argv`."""
    if task not in TASKS:
        raise SystemExit(f"error: unknown --task {task!r}; choose one of lm, {', '.join(TASKS)}")
    module = importlib.import_module(TASKS[task])
    entry = getattr(module, f"{command}_main", None)
    if entry is None:
        raise SystemExit(f"error: task {task!r} has no `mambakit {command}`")
    return entry(argv)
