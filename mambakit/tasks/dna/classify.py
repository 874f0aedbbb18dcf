"""`mambakit train --task dna-classify --data FILES_OR_DIRS --backbone causal|bidirectional|rc`:
is a window real genome, or a sample with the genome's k-mer statistics?

Half the windows of a batch (at random) are genome, read from the training records (splits.py);
the other half are windows of chains drawn once from an order-k Markov model (--markov-order)
fitted on the same records and seeded with genome k-mers, so that the two classes share their
(k+1)-mer statistics in expectation and only longer-range structure (codons, genes, repeats)
tells them apart. The chains are drawn all at once (the loop runs over positions, a step of
every chain at a time) and the windows cut from them, since drawing each batch's samples base
by base bounds the long windows' steps on the host. A sample takes the N and separator tokens
of a genome window where they were, so neither class is told by those. The held-out windows are
the held-out records' against a Markov model fitted on them. Each window is reverse-complemented
with probability 1/2 (--rc-augment).

Three backbones (models/dna.py): causal Mamba, bidirectional Mamba (Vim's BiMamba), and the
RC-equivariant bidirectional Mamba (Caduceus's parameter sharing), whose logits are the same for
a window and its reverse complement at any weights. The summary gives the held-out accuracy and
`rc_agreement`: the fraction of held-out windows classified the same as their reverse complement."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
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


MIN_CHAIN = 2**14  # bases per Markov chain at the least: one loop over positions serves many windows
TRAIN_POOL_BASES = 2**27  # at most: longer runs cut their samples from these again
POOL_OVERDRAW = 4  # chains hold this many times the training samples' bases: few repeats
CHAINS_STREAM = 0x6B6D6572  # keeps the chains' random numbers apart from the batches'


@dataclass
class Sampler:
    """Batches of genome windows and k-mer-matched samples from one split."""
    stream: Stream
    markov: MarkovModel
    seq_len: int
    pool_bases: int = TRAIN_POOL_BASES  # Markov bases drawn once, the samples' source
    chain_len: int | None = None  # None: max(seq_len, MIN_CHAIN), or the pool if it is smaller
    seed: tuple[int, ...] = (0,)  # the chains' random stream
    _chains: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def chains(self) -> np.ndarray:
        """(n_chains, chain_len) uint8: the Markov chains, drawn on first use, each seeded with a
        genome k-mer and at least seq_len bases long."""
        if self._chains is None:
            chain_len = self.chain_len or max(self.seq_len, min(MIN_CHAIN, self.pool_bases))
            if chain_len < self.seq_len:
                raise ValueError(f"chain_len ({chain_len}) must be at least the window, {self.seq_len}")
            n_chains = max(1, -(-self.pool_bases // chain_len))
            rng = np.random.default_rng(np.random.SeedSequence([*self.seed, CHAINS_STREAM]))
            k = self.markov.order
            seeds = self.stream.windows(self.stream.random_starts(rng, n_chains, k), k)[:, :k]  # (n_chains, k)
            self._chains = self.markov.sample(seeds.clip(max=N_BASES - 1), chain_len, rng)
        return self._chains

    def samples(self, n: int, rng: np.random.Generator, distinct: bool = False) -> np.ndarray:
        """(n, seq_len) windows cut from the chains: at random, or (distinct) the start of chain i
        for row i, so that no two rows share a base."""
        chains = self.chains()  # (n_chains, chain_len)
        if distinct:
            if n > chains.shape[0]:
                raise ValueError(f"{n} distinct samples need as many chains, the pool has {chains.shape[0]}")
            which, offsets = np.arange(n), np.zeros(n, dtype=np.int64)
        else:
            which = rng.integers(0, chains.shape[0], size=n)
            offsets = rng.integers(0, chains.shape[1] - self.seq_len + 1, size=n)
        return chains[which[:, None], offsets[:, None] + np.arange(self.seq_len)]  # (n, seq_len)

    def rows(self, starts: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
             distinct: bool = False) -> np.ndarray:
        """(n,) starts and labels -> (n, seq_len) uint8: the genome window at each start, or for
        label SAMPLE a Markov sample with that window's N and separator tokens put in."""
        windows = self.stream.windows(starts, self.seq_len - 1)  # (n, seq_len)
        fake = labels == SAMPLE
        if fake.any():
            sampled = self.samples(int(fake.sum()), rng, distinct)
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
    """The fixed held-out windows: n starts spread evenly, labels alternating, each sample the
    start of its own chain (the sampler's pool must hold n // 2 chains)."""
    starts = sampler.stream.even_starts(n, sampler.seq_len - 1)
    labels = (np.arange(n) % 2 == 0).astype(np.int64) * GENOME  # GENOME, SAMPLE, GENOME, ...
    return sampler.rows(starts, labels, rng_for(seed, 0, "eval"), distinct=True), labels


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


def prepare_samplers(args) -> tuple[DNAData, Sampler, Sampler]:
    """The data and the training and held-out samplers of parsed flags."""
    data: DNAData = prepare_data(args.data, args.valid, args.valid_fraction, args.seq_len, args.reader)
    n_eval = args.eval_batches * args.batch_size
    # drawn with replacement, samples repeat a whole chain when chains are as long as a window:
    # POOL_OVERDRAW times the bases the training samples take keeps that to about 1 in 9
    train_samples = args.max_steps * args.batch_size * args.seq_len // 2  # bases of the training samples, about
    train = Sampler(data.train, MarkovModel.fit(data.train.tokens, args.markov_order), args.seq_len,
                    pool_bases=min(TRAIN_POOL_BASES, max(POOL_OVERDRAW * train_samples, args.seq_len)),
                    seed=(args.seed, 0))
    held = Sampler(data.valid, MarkovModel.fit(data.valid.tokens, args.markov_order), args.seq_len,
                   pool_bases=(n_eval + 1) // 2 * args.seq_len, chain_len=args.seq_len, seed=(args.seed, 1))
    return data, train, held


SAMPLER_FLAGS = ("data", "valid", "valid_fraction", "reader", "seq_len", "max_steps", "batch_size", "eval_batches",
                 "markov_order", "seed")  # what prepare_samplers reads


def shared_samplers(args, samplers: dict) -> tuple[DNAData, Sampler, Sampler]:
    """prepare_samplers(args), kept in `samplers` for the runs whose flags give the same ones."""
    key = repr([getattr(args, name) for name in SAMPLER_FLAGS])
    if key not in samplers:
        samplers[key] = prepare_samplers(args)
    return samplers[key]


def run(args, progress: bool = True, samplers: dict | None = None):
    """Trains one classifier from parsed flags; returns (model, summary, per-step rows). Runs
    that differ only in the model (the benchmark's backbones) can share their data and Markov
    chains through `samplers`, a dict kept by the caller."""
    from ..fit import fit
    from ..report import announce, task_summary
    from ..synthetic import autocast_for, fit_config, model_args, n_params, resolve_device
    model_args(args)  # checks the sizes
    if args.layer != "mamba" or not args.gate:
        raise ValueError("dna-classify builds its layers from --backbone (causal, bidirectional, rc); "
                         "--layer and --no-gate do not apply")
    data, train, held = shared_samplers(args, {} if samplers is None else samplers)
    n_eval = args.eval_batches * args.batch_size
    device = resolve_device(args.device)
    model = build_model(args, device)
    eval_rows, eval_labels = held_out_rows(held, n_eval, args.seed)
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


__all__ = ["Sampler", "build_train_parser", "held_out_rows", "prepare_samplers", "shared_samplers", "train_main"]
