"""Selective copying (Gu & Dao 2023, section 3.1 and appendix E.1): remember a few tokens
scattered at random positions among noise, then output them in order.

Vocabulary (16 tokens):
- 0 (NOISE): the filler between the tokens to remember;
- 1..14: the data tokens;
- 15 (MARKER): the answer positions: "output the next remembered token now".

A sequence of --seq-len tokens (answers included) is a context of seq_len - n_memorize tokens,
all NOISE but n_memorize data tokens at random distinct positions (uniform, so their spacing
varies: an LTI model cannot solve it with a fixed delay), then n_memorize MARKERs. At the i-th
MARKER the model must predict the i-th data token of the context. The loss and the accuracy
(per token) count the answer positions only.

`mambakit train --task selective-copying --layer s4d --no-gate ...` trains one of the paper's
Table 1 variants, and `--attn-layers 1` a hybrid (layer 1 causal attention); --help lists the
flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .synthetic import check_positive_int, rng_for, to_device

VOCAB_SIZE = 16
NOISE = 0
MARKER = 15
N_DATA_TOKENS = 14  # the tokens 1..14


@dataclass
class SelectiveCopying:
    seq_len: int = 4096  # the whole input: context + n_memorize answer markers
    n_memorize: int = 16

    def __post_init__(self) -> None:
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("n_memorize", self.n_memorize)
        if self.seq_len < 2 * self.n_memorize:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 2 * n_memorize ({2 * self.n_memorize}): "
                             f"the context holds n_memorize tokens, then n_memorize answer markers follow")

    @property
    def context_len(self) -> int:
        return self.seq_len - self.n_memorize

    def batch_np(self, batch_size: int, seed: int, step: int, split: str = "train"
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (B, seq_len), answers (B, n_memorize)) as uint8 arrays: batch `step` of the
        stream `seed` / `split`."""
        check_positive_int("batch_size", batch_size)
        rng = rng_for(seed, step, split)
        n, ctx = self.n_memorize, self.context_len
        answers = rng.integers(1, 1 + N_DATA_TOKENS, size=(batch_size, n), dtype=np.uint8)  # (B, n)
        # n distinct positions per row, uniformly, in increasing order
        positions = np.sort(np.argpartition(rng.random((batch_size, ctx)), n - 1, axis=1)[:, :n], axis=1)  # (B, n)
        inputs = np.full((batch_size, self.seq_len), NOISE, dtype=np.uint8)  # (B, L)
        np.put_along_axis(inputs, positions, answers, axis=1)
        inputs[:, ctx:] = MARKER
        return inputs, answers

    def batch(self, batch_size: int, seed: int, step: int, split: str = "train", device=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, seq_len), answers (B, n_memorize)) as int64 tensors on `device`."""
        inputs, answers = self.batch_np(batch_size, seed, step, split)
        return to_device(inputs, answers, device=device)


def answer_logits(model, inputs: torch.Tensor, n_memorize: int) -> torch.Tensor:
    """inputs (B, L) -> the logits at the answer positions over the task's vocabulary, (B, n, 16)."""
    return model(inputs, logits_to_keep=n_memorize)[..., :VOCAB_SIZE]


def loss_fn(model, inputs: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer positions only (in fp32)."""
    logits = answer_logits(model, inputs, answers.shape[1]).float()  # (B, n, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), answers.flatten())


@torch.no_grad()
def evaluate(model, task: SelectiveCopying, batch_size: int, n_batches: int, seed: int, device,
             autocast=None) -> dict:
    """Per-token accuracy on the answers (and the fraction of sequences with every answer
    right) over n_batches held-out batches (the "eval" stream of `seed`)."""
    correct = total = full = 0
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        inputs, answers = task.batch(batch_size, seed, i, "eval", device)
        if autocast is not None:
            with autocast():
                logits = answer_logits(model, inputs, task.n_memorize)
        else:
            logits = answer_logits(model, inputs, task.n_memorize)
        hit = logits.argmax(-1) == answers  # (B, n)
        correct += int(hit.sum())
        total += hit.numel()
        full += int(hit.all(dim=1).sum())
    model.train(was_training)
    return {"accuracy": correct / total, "sequence_accuracy": full / (n_batches * batch_size)}


def length_curriculum(seq_len: int, start_len: int | None, max_steps: int) -> Callable[[int], int]:
    """The training length at each step. Without start_len, always seq_len. With it, the length
    doubles from start_len towards seq_len over the first half of the steps, one equal share
    per length, and the second half trains at seq_len. The selection mechanism does not depend
    on the length, so it is learnt on short sequences at a fraction of the cost; every
    evaluation is at seq_len."""
    if start_len is None or start_len >= seq_len:
        return lambda step: seq_len
    stages = []
    length = start_len
    while length < seq_len:
        stages.append(length)
        length *= 2
    share = (max_steps // 2) / len(stages)

    def at(step: int) -> int:
        stage = int(step // share) if share > 0 else len(stages)
        return stages[stage] if stage < len(stages) else seq_len
    return at


def run(args, progress: bool = True) -> tuple[object, dict, list[dict]]:
    """Trains one model from parsed flags; returns (model, summary, per-step rows)."""
    from .fit import fit
    from .synthetic import autocast_for, build_model, fit_config, model_args, resolve_device, start, summary_base
    margs = model_args(args)
    task = SelectiveCopying(args.seq_len, args.n_memorize)
    device = resolve_device(args.device)
    model = build_model(margs, VOCAB_SIZE, device, args.seed)
    start("selective-copying", args, model, device, progress)
    autocast = autocast_for(device)
    cfg = fit_config(args)
    batch_size = args.batch_size
    length_at = length_curriculum(args.seq_len, args.curriculum_from, args.max_steps)
    tasks = {args.seq_len: task}

    def batch_at(step):
        length = length_at(step)
        if length not in tasks:
            tasks[length] = SelectiveCopying(length, args.n_memorize)
        return tasks[length].batch(batch_size, args.seed, step, "train", device)

    def ev():
        return evaluate(model, task, batch_size, args.eval_batches, args.seed, device, autocast)

    rows = fit(model, batch_at, loss_fn, cfg, evaluate=ev, progress=progress, autocast=autocast)
    summary = summary_base("selective-copying", args, model, rows, device, rows[-1].get("accuracy"))
    summary.update(n_memorize=args.n_memorize, curriculum_from=args.curriculum_from,
                   sequence_accuracy=rows[-1].get("sequence_accuracy"))
    return model, summary, rows


def build_parser() -> argparse.ArgumentParser:
    from .synthetic import add_common_flags
    parser = argparse.ArgumentParser(prog="mambakit train --task selective-copying",
                                     description=__doc__.split("\n\n")[0])
    add_common_flags(parser, seq_len=4096, max_steps=4000, batch_size=64, lr=2e-3,
                     out_dir="runs/selective-copying")
    parser.add_argument("--n-memorize", type=int, default=16, help="tokens to remember (default 16)")
    parser.add_argument("--curriculum-from", type=int, default=None, metavar="LEN",
                        help="train on lengths doubling from LEN up to --seq-len over the first half of the "
                             "steps, then at --seq-len (default: --seq-len throughout)")
    return parser


def train_main(argv: list[str]) -> int:
    from .report import print_summary, save_run
    from .synthetic import describe_model, model_args
    args = build_parser().parse_args(argv)
    try:
        SelectiveCopying(args.seq_len, args.n_memorize)
        if args.curriculum_from is not None:
            SelectiveCopying(args.curriculum_from, args.n_memorize)  # a clear error for a too-short start
        model, summary, rows = run(args, progress=args.progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.out_dir:
        title = f"selective copying: {describe_model(model_args(args))}"
        save_run(args.out_dir, model, summary, rows, "accuracy", title)
    print_summary(summary)
    return 0
