"""`mambakit train --task dna-classify --data FILES_OR_DIRS --backbone causal|bidirectional|rc`:
is a window real genome, or a sample with the genome's k-mer statistics?

Half the windows of a batch (at random) are genome, read from the training records (splits.py);
the other half are drawn from an order-k Markov model (--markov-order) fitted on the same
records, seeded with a genome window's first k bases, so that the two classes share their
(k+1)-mer statistics in expectation and only longer-range structure (codons, genes, repeats)
tells them apart. A sample keeps its seed window's N and separator tokens where they were, so
neither class is told by those. The held-out windows are the held-out records' against a Markov
model fitted on them. Each window is reverse-complemented with probability 1/2 (--rc-augment).

Three backbones (models/dna.py): causal Mamba, bidirectional Mamba (Vim's BiMamba), and the
RC-equivariant bidirectional Mamba (Caduceus's parameter sharing), whose logits are the same for
a window and its reverse complement at any weights. The summary gives the held-out accuracy and
`rc_agreement`: the fraction of held-out windows classified the same as their reverse complement."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..synthetic import rng_for, to_device
from .markov import MarkovModel
from .splits import Stream, augment_reverse_complement
from .task import DNAData, add_data_flags, prepare_data
from .tokenizer import N_BASES, reverse_complement

GENOME, SAMPLE = 1, 0  # the labels
MODEL_FORMAT = "mambakit-dna-classifier"


@dataclass
class Sampler:
    """Batches of genome windows and k-mer-matched samples from one split."""
    stream: Stream
    markov: MarkovModel
    seq_len: int

    def rows(self, starts: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n,) starts and labels -> (n, seq_len) uint8: the genome window at each start, or for
        label SAMPLE a Markov sample seeded with its first k bases, its N and separators kept."""
        windows = self.stream.windows(starts, self.seq_len - 1)  # (n, seq_len)
        fake = labels == SAMPLE
        if fake.any():
            k = self.markov.order
            sampled = self.markov.sample(windows[fake, :k].clip(max=N_BASES - 1), self.seq_len, rng)
            not_bases = windows[fake] >= N_BASES
            sampled[not_bases] = windows[fake][not_bases]
            windows[fake] = sampled
        return windows

    def batch(self, batch_size: int, rng: np.random.Generator, rc_augment: bool) -> tuple[np.ndarray, np.ndarray]:
        labels = (rng.random(batch_size) < 0.5).astype(np.int64)  # (B,)
        rows = self.rows(self.stream.random_starts(rng, batch_size, self.seq_len - 1), labels, rng)
        if rc_augment:
            rows = augment_reverse_complement(rows, rng)
        return rows, labels


def held_out_rows(sampler: Sampler, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed held-out windows: n starts spread evenly, labels alternating, samples seeded per row."""
    starts = sampler.stream.even_starts(n, sampler.seq_len - 1)
    labels = (np.arange(n) % 2 == 0).astype(np.int64) * GENOME  # GENOME, SAMPLE, GENOME, ...
    return sampler.rows(starts, labels, rng_for(seed, 0, "eval")), labels


@torch.no_grad()
def predict(model, rows: np.ndarray, batch_size: int, device) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = [model(to_device(rows[i:i + batch_size], device=device)[0]).argmax(-1).cpu().numpy()
           for i in range(0, len(rows), batch_size)]
    model.train(was_training)
    return np.concatenate(out)


def build_model(args, device):
    from ...models.dna import DNAClassifier, DNAClassifierConfig
    torch.manual_seed(args.seed)
    cfg = DNAClassifierConfig(backbone=args.backbone, num_classes=2, d_model=args.d_model, n_layer=args.n_layer,
                              d_state=args.d_state)
    return DNAClassifier(cfg).to(device)


def run(args, progress: bool = True):
    """Trains one classifier from parsed flags; returns (model, summary, per-step rows)."""
    from ..fit import fit
    from ..report import announce, task_summary
    from ..synthetic import autocast_for, fit_config, model_args, n_params, resolve_device
    model_args(args)  # checks the sizes
    if args.layer != "mamba" or not args.gate:
        raise ValueError("dna-classify builds its layers from --backbone (causal, bidirectional, rc); "
                         "--layer and --no-gate do not apply")
    data: DNAData = prepare_data(args.data, args.valid, args.valid_fraction, args.seq_len, args.reader)
    train = Sampler(data.train, MarkovModel.fit(data.train.tokens, args.markov_order), args.seq_len)
    held = Sampler(data.valid, MarkovModel.fit(data.valid.tokens, args.markov_order), args.seq_len)
    device = resolve_device(args.device)
    model = build_model(args, device)
    eval_rows, eval_labels = held_out_rows(held, args.eval_batches * args.batch_size, args.seed)
    if progress:
        print(f"[mambakit] dna-classify: {data.describe()}; genome against order-{args.markov_order} Markov samples",
              file=sys.stderr)
        announce(f"dna-classify ({args.backbone})", n_params(model), args.max_steps,
                 f"{args.batch_size} x {args.seq_len} tokens", args.max_steps * args.batch_size * args.seq_len, device)

    def batch_at(step):
        rows, labels = train.batch(args.batch_size, rng_for(args.seed, step, "train"), args.rc_augment)
        return to_device(rows, labels, device=device)

    def loss_fn(model, rows, labels):
        return torch.nn.functional.cross_entropy(model(rows).float(), labels)

    def evaluate():
        return {"accuracy": float((predict(model, eval_rows, args.batch_size, device) == eval_labels).mean())}

    rows = fit(model, batch_at, loss_fn, fit_config(args), evaluate=evaluate, progress=progress,
               autocast=autocast_for(device))
    predicted = predict(model, eval_rows, args.batch_size, device)
    predicted_rc = predict(model, reverse_complement(eval_rows), args.batch_size, device)
    summary = task_summary("dna-classify", accuracy=float((predicted == eval_labels).mean()), rows=rows,
                           n_params=n_params(model), steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, device=device, model=dataclasses.asdict(model.cfg), out_dir=args.out_dir)
    summary.update({"backbone": args.backbone, "seq_len": args.seq_len, "markov_order": args.markov_order,
                    "rc_agreement": float((predicted == predicted_rc).mean()), "held_out_windows": len(eval_rows),
                    "data": {"files": data.files, "held_out_by": data.split.unit,
                             "held_out": sorted({s.source for s in data.split.valid}), "rc_augment": args.rc_augment}})
    return model, summary, rows


def save_model(model, directory: Path) -> None:
    """config.json (the DNAClassifierConfig) and model.safetensors, written as a whole."""
    from safetensors.torch import save_file

    from ...checkpoint import atomic_write, atomic_write_json, write_directory
    config = {"format": MODEL_FORMAT, "task": "dna-classify", "classifier": dataclasses.asdict(model.cfg)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(into: Path) -> None:
        atomic_write(into / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_json(into / "config.json", config)  # last: it marks a complete checkpoint

    write_directory(directory, write, owned=lambda _: {"config.json", "model.safetensors"})


def build_train_parser() -> argparse.ArgumentParser:
    from ..synthetic import add_common_flags
    parser = argparse.ArgumentParser(prog="mambakit train --task dna-classify", description=__doc__.split("\n\n")[0])
    add_common_flags(parser, seq_len=512, max_steps=200, batch_size=16, lr=2e-3, out_dir="runs/dna-classify")
    parser.set_defaults(d_model=32, n_layer=2, eval_batches=8)
    parser.add_argument("--backbone", choices=["causal", "bidirectional", "rc"], default="rc",
                        help="causal Mamba, bidirectional Mamba, or the RC-equivariant bidirectional Mamba")
    add_data_flags(parser)
    parser.add_argument("--markov-order", type=int, default=3,
                        help="the order k of the Markov model the negative windows are drawn from")
    parser.add_argument("--rc-augment", action=argparse.BooleanOptionalAction, default=True,
                        help="train on each window or its reverse complement, at random")
    return parser


def train_main(argv: list[str]) -> int:
    from ..report import print_summary, save_run
    args = build_train_parser().parse_args(argv)
    try:
        if not 0 <= args.markov_order <= 8:
            raise ValueError(f"--markov-order must be in [0, 8], got {args.markov_order}")
        if args.seq_len <= args.markov_order:
            raise ValueError(f"--seq-len ({args.seq_len}) must exceed --markov-order ({args.markov_order})")
        model, summary, rows = run(args, progress=args.progress)
    except ValueError as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from None
    if args.out_dir:
        save_run(args.out_dir, model, summary, rows, "accuracy", f"DNA: genome or k-mer sample ({args.backbone})",
                 save_model=lambda d: save_model(model, d))
    print_summary(summary)
    return 0


__all__ = ["Sampler", "build_train_parser", "held_out_rows", "train_main"]
