"""`mambakit train --task dna --data FILES_OR_DIRS`: a causal MambaLM (the registry's
"mamba_dna", 6 tokens) on genomes, scored in held-out bits per base.

The data: FASTA/FASTQ files (plain, .gz, .xz) or directories of them (fasta.py), tokenized one
base a token (tokenizer.py), split so that no base is both trained on and held out (splits.py:
whole files, else whole records, else a record's tail), windows of --seq-len bases drawn from
the training records laid end to end with a separator, each window reverse-complemented with
probability 1/2 (--rc-augment). Held-out bits per base are scored on A, C, G, T targets of
fixed windows spread over the held-out records (--eval-batches x --batch-size of them), with
order-k Markov baselines fitted on the training split (markov.py) on the same targets: 2.0 is
the uniform rate, and a model that learns only k-mer statistics reaches the baseline's.

`mambakit eval --task dna --model DIR --data FILES` scores a trained model on other files."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...training.devices import DEVICE_HELP
from ..synthetic import check_positive_int, rng_for, to_device
from .markov import MarkovModel
from .splits import (IGNORE_INDEX, Split, Stream, augment_reverse_complement, held_out_split, inputs_targets,
                     load_genomes, scored)
from .tokenizer import VOCAB_SIZE

UNIFORM_BITS = 2.0


@dataclass
class DNAData:
    split: Split
    train: Stream
    valid: Stream
    n_bases: int
    n_ambiguous: int
    files: list[str]

    def describe(self) -> str:
        held = sorted({Path(s.source).name + ("" if self.split.unit == "file" else f":{s.name}")
                       for s in self.split.valid})
        return (f"{self.n_bases / 1e6:.2f} Mbp in {len(self.files)} file(s); held out by {self.split.unit}: "
                f"{', '.join(held)} ({len(self.valid) / 1e6:.2f} Mbp), training on {len(self.train) / 1e6:.2f} Mbp"
                + (f"; {self.n_ambiguous} IUPAC ambiguity codes read as N" if self.n_ambiguous else ""))


def prepare_data(data: list[str], valid: list[str] | None, valid_fraction: float, seq_len: int,
                 reader: str = "auto") -> DNAData:
    """Reads, tokenizes and splits the genomes; a ValueError names a bad file."""
    genomes = load_genomes(data, reader)
    split = held_out_split(genomes.sequences, valid, valid_fraction)
    train, held = Stream.of(split.train), Stream.of(split.valid)
    train.check_length(seq_len, "the training split")
    held.check_length(seq_len, "the held-out split")
    return DNAData(split, train, held, genomes.n_bases, genomes.n_ambiguous, genomes.files)


# ---- batches, loss, scores ---------------------------------------------------------------

def train_batch(stream: Stream, batch_size: int, seq_len: int, seed: int, step: int, rc_augment: bool):
    """(inputs (B, L) uint8, targets (B, L) int64): batch `step` of the stream `seed`, a pure function of them."""
    rng = rng_for(seed, step, "train")
    windows = stream.windows(stream.random_starts(rng, batch_size, seq_len), seq_len)  # (B, L + 1)
    if rc_augment:
        windows = augment_reverse_complement(windows, rng)
    return inputs_targets(windows)


def loss_fn(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the DNA tokens (in fp32); separator targets add nothing."""
    logits = model(inputs)[..., :VOCAB_SIZE].float()  # (B, L, 6)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class HeldOut:
    """The fixed held-out windows and the positions in the stream of the targets they score."""
    starts: np.ndarray  # (n,)
    seq_len: int

    def positions(self, stream: Stream) -> np.ndarray:
        """The stream positions of every scored target (A, C, G, T), window by window."""
        _, targets = inputs_targets(stream.windows(self.starts, self.seq_len))
        rows, cols = np.nonzero(scored(targets))
        return self.starts[rows] + cols + 1


@torch.no_grad()
def model_scores(model, stream: Stream, held: HeldOut, batch_size: int, device, autocast=None) -> dict:
    """{"bpb": held-out bits per base, "accuracy": top-1 next-base accuracy} on the scored targets."""
    was_training = model.training
    model.eval()
    nats, correct, count = 0.0, 0, 0
    for i in range(0, len(held.starts), batch_size):
        inputs, targets = inputs_targets(stream.windows(held.starts[i:i + batch_size], held.seq_len))
        mask = torch.from_numpy(scored(targets)).to(device)
        x, y = to_device(inputs, targets.clip(min=0), device=device)
        if autocast is not None:
            with autocast():
                logits = model(x)
        else:
            logits = model(x)
        logp = torch.log_softmax(logits[..., :VOCAB_SIZE].float(), dim=-1)  # (B, L, 6)
        nll = -logp.gather(-1, y[..., None])[..., 0]  # (B, L)
        nats += float(nll[mask].sum())
        correct += int((logp.argmax(-1) == y)[mask].sum())
        count += int(mask.sum())
    model.train(was_training)
    return {"bpb": nats / count / math.log(2), "accuracy": correct / count}


def markov_baselines(data: DNAData, held: HeldOut, orders: list[int]) -> dict[int, float]:
    """Held-out bits per base of order-k Markov models fitted on the training split, on the
    targets the model is scored on."""
    positions = held.positions(data.valid)
    return {k: float(MarkovModel.fit(data.train.tokens, k).bits(data.valid.tokens, positions).mean()) for k in orders}


def parse_orders(text: str) -> list[int]:
    try:
        orders = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--markov-orders: expected a comma-separated list of ints, got {text!r}") from None
    if any(not 0 <= k <= 8 for k in orders):
        raise ValueError(f"--markov-orders: every order must be in [0, 8], got {text!r}")
    return orders


def baseline_line(bpb: float | None, markov: dict[int, float]) -> str:
    parts = [] if bpb is None else [f"model {bpb:.4f}"]
    parts += [f"order-{k} Markov {v:.4f}" for k, v in sorted(markov.items())]
    return "held-out bits per base: " + " | ".join(parts + [f"uniform {UNIFORM_BITS:.1f}"])


# ---- training ----------------------------------------------------------------------------

def build_model(args, device: torch.device):
    from ...models.dna import dna_lm  # the registry's "mamba_dna"
    torch.manual_seed(args.seed)
    return dna_lm(d_model=args.d_model, n_layer=args.n_layer, d_state=args.d_state,
                        layer=args.layer, gate=args.gate).to(device)


def run(args, progress: bool = True):
    """Trains one model from parsed flags; returns (model, summary, per-step rows)."""
    from ..fit import fit
    from ..synthetic import autocast_for, fit_config, model_args, resolve_device, start, summary_base
    model_args(args)  # checks the sizes
    data = prepare_data(args.data, args.valid, args.valid_fraction, args.seq_len, args.reader)
    orders = parse_orders(args.markov_orders)
    device = resolve_device(args.device)
    model = build_model(args, device)
    held = HeldOut(data.valid.even_starts(args.eval_batches * args.batch_size, args.seq_len), args.seq_len)
    markov = markov_baselines(data, held, orders)
    if progress:
        print(f"[mambakit] dna: {data.describe()}", file=sys.stderr)
        print(f"[mambakit] dna: {baseline_line(None, markov)}", file=sys.stderr, flush=True)
    start("dna", args, model, device, progress)
    autocast = autocast_for(device)

    def batch_at(step):
        inputs, targets = train_batch(data.train, args.batch_size, args.seq_len, args.seed, step, args.rc_augment)
        return to_device(inputs, targets, device=device)

    def evaluate():
        return model_scores(model, data.valid, held, args.batch_size, device, autocast)

    rows = fit(model, batch_at, loss_fn, fit_config(args), evaluate=evaluate, progress=progress, autocast=autocast)
    final = next((r for r in reversed(rows) if "bpb" in r), {})
    summary = summary_base("dna", args, model, rows, device, final.get("accuracy"))
    summary["model"]["vocab_size"] = VOCAB_SIZE
    summary.update({"bpb": final.get("bpb"), "markov_bpb": {str(k): v for k, v in markov.items()},
                    "uniform_bpb": UNIFORM_BITS,
                    "data": {"files": data.files, "bases": data.n_bases, "held_out_by": data.split.unit,
                             "held_out": sorted({s.source for s in data.split.valid}),
                             "train_tokens": len(data.train), "held_out_tokens": len(data.valid),
                             "scored_targets": int(len(held.positions(data.valid))),
                             "ambiguous_as_n": data.n_ambiguous, "rc_augment": args.rc_augment}})
    return model, summary, rows


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True,
                        help="FASTA/FASTQ files (plain, .gz, .xz, .bz2) or directories of them")
    parser.add_argument("--valid", nargs="+", default=None,
                        help="the files to hold out (path, file name or name without suffixes); default: the "
                             "last file (several files), else the last records, else a record's tail")
    parser.add_argument("--valid-fraction", type=float, default=0.1,
                        help="one file: hold out at least this fraction of the bases (whole records, or a tail)")
    parser.add_argument("--reader", choices=["auto", "pyfastx", "python"], default="auto",
                        help="the FASTA parser: pyfastx (pip install 'mambakit[dna]'; plain and gzip) or the "
                             "plain Python one (auto: pyfastx where it can)")


def build_train_parser() -> argparse.ArgumentParser:
    from ..synthetic import add_common_flags
    parser = argparse.ArgumentParser(prog="mambakit train --task dna", description=__doc__.split("\n\n")[0])
    add_common_flags(parser, seq_len=1024, max_steps=300, batch_size=8, lr=4e-3, out_dir="runs/dna")
    parser.set_defaults(d_model=64, n_layer=4, eval_batches=4)
    add_data_flags(parser)
    parser.add_argument("--rc-augment", action=argparse.BooleanOptionalAction, default=True,
                        help="train on each window or its reverse complement (the other strand), at random")
    parser.add_argument("--markov-orders", default="3,4,5,6",
                        help="the orders k of the Markov baselines printed beside the model")
    return parser


def train_main(argv: list[str]) -> int:
    from ..report import print_summary, save_run
    args = build_train_parser().parse_args(argv)
    try:
        model, summary, rows = run(args, progress=args.progress)
    except ValueError as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from None
    if args.out_dir:
        save_run(args.out_dir, model, summary, rows, "accuracy", "DNA: held-out next-base accuracy")
        plot_bpb(rows, summary["markov_bpb"], Path(args.out_dir) / "bpb.png")
    print(f"[mambakit] dna: {baseline_line(summary['bpb'], {int(k): v for k, v in summary['markov_bpb'].items()})}",
          file=sys.stderr)
    print_summary(summary)
    return 0


def plot_bpb(rows: list[dict], markov: dict[str, float], path: Path) -> None:
    """Held-out bits per base against the step, with the Markov baselines as lines."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    ev = [r for r in rows if "bpb" in r]
    ax.plot([r["step"] for r in ev], [r["bpb"] for r in ev], marker="o", label="Mamba")
    for k, v in sorted(markov.items()):
        ax.axhline(v, ls=":", lw=0.8, color="gray")
        ax.annotate(f"order-{k} Markov", (0, v), fontsize=7, color="gray", va="bottom")
    ax.axhline(UNIFORM_BITS, ls="--", lw=0.8, color="black", label="uniform")
    ax.set(xlabel="step", ylabel="held-out bits per base", title="DNA language model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- evaluation --------------------------------------------------------------------------

def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit eval --task dna",
                                     description="held-out bits per base of a model of `mambakit train --task dna` "
                                                 "on the files given (all of them scored)")
    parser.add_argument("--model", required=True, help="the model's directory (the run's --out-dir)")
    parser.add_argument("--data", nargs="+", required=True, help="FASTA/FASTQ files or directories to score")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows", type=int, default=32, help="windows spread evenly over the files")
    parser.add_argument("--reader", choices=["auto", "pyfastx", "python"], default="auto")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser


def eval_main(argv: list[str]) -> int:
    from ...models.lm import MambaLM
    from ..synthetic import autocast_for, resolve_device
    from .splits import load_genomes
    args = build_eval_parser().parse_args(argv)
    try:
        for name in ("seq_len", "batch_size", "windows"):
            check_positive_int("--" + name.replace("_", "-"), getattr(args, name))
        stream = Stream.of(load_genomes(args.data, args.reader).sequences)
        stream.check_length(args.seq_len, "the data")
        device = resolve_device(args.device)
        model = MambaLM.from_pretrained(args.model, device=device).eval()
        if model.config.vocab_size != VOCAB_SIZE:
            raise ValueError(f"--model {args.model} has a vocabulary of {model.config.vocab_size} tokens, "
                             f"not the {VOCAB_SIZE} DNA tokens")
        held = HeldOut(stream.even_starts(args.windows, args.seq_len), args.seq_len)
        scores = model_scores(model, stream, held, args.batch_size, device, autocast_for(device))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from None
    print(json.dumps({"task": "dna", "model": str(args.model), "device": str(device), "seq_len": args.seq_len,
                      "windows": args.windows, **scores}, sort_keys=True))
    return 0

