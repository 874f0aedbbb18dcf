"""Induction heads (Gu & Dao 2023, section 4.1.2 and appendix E.1): recall the token that
followed a trigger token, when the trigger comes back at the end.

Vocabulary (16 tokens): 0..14 are content tokens, 15 (TRIGGER) is the special token. A sequence
of --seq-len tokens is uniform random content tokens, except that TRIGGER appears exactly twice:
once at a random position p (p <= seq_len - 3), followed at p + 1 by the token to recall, and as
the last token. The model must predict, at the last position, the token at p + 1. The loss and
the accuracy count that position only.

The paper trains at length 256 and tests at every power of two from 2^6 to 2^20.
`mambakit eval --task induction-heads --model DIR --lengths 64..1048576` does that: each
sequence runs chunk by chunk through the model with its constant-size recurrent state carried
(no gradients), so memory does not grow with the length.

A hybrid's attention layers (--attn-layers) carry a KV cache instead, which grows with the
length, and attend over all of it: its evaluation estimates the memory each length needs
(`evaluation_memory`), cuts the sequence into shorter chunks to fit a budget, and records a
length that does not fit as {"accuracy": null, "status": "not run: memory"} rather than
running out of memory (a length that runs out all the same: "not run: oom"; one predicted to
overrun a time budget: "not run: time")."""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..training.devices import DEVICE_HELP
from .synthetic import check_positive_int, rng_for, to_device

VOCAB_SIZE = 16
TRIGGER = 15
N_CONTENT_TOKENS = 15  # the tokens 0..14
MIN_ATTENTION_CHUNK = 64  # the shortest chunk a hybrid's evaluation is cut into to fit its memory budget


@dataclass
class InductionHeads:
    seq_len: int = 256

    def __post_init__(self) -> None:
        check_positive_int("seq_len", self.seq_len, minimum=4)

    def batch_np(self, batch_size: int, seed: int, step: int, split: str = "train"
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (B, seq_len) uint8, targets (B,) uint8): batch `step` of the stream `seed` / `split`."""
        check_positive_int("batch_size", batch_size)
        rng = rng_for(seed, step, split)
        L = self.seq_len
        inputs = rng.integers(0, N_CONTENT_TOKENS, size=(batch_size, L), dtype=np.uint8)  # (B, L)
        trigger_at = rng.integers(0, L - 2, size=batch_size)  # (B,): p in [0, L-3]
        rows = np.arange(batch_size)
        inputs[rows, trigger_at] = TRIGGER
        inputs[:, -1] = TRIGGER
        targets = inputs[rows, trigger_at + 1].copy()  # (B,): a content token, p + 1 <= L - 2
        return inputs, targets

    def batch(self, batch_size: int, seed: int, step: int, split: str = "train", device=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batch_np(batch_size, seed, step, split)
        return to_device(inputs, targets, device=device)


def loss_fn(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the last position only (in fp32)."""
    logits = model(inputs, logits_to_keep=1)[:, -1, :VOCAB_SIZE].float()  # (B, V)
    return torch.nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def last_logits_chunked(model, inputs: np.ndarray, chunk_len: int, device, autocast=None) -> torch.Tensor:
    """inputs (B, L) uint8 -> the logits at the last position (B, 16), running chunk_len tokens at a
    time with the recurrent state (a constant-size LMCache) carried across chunks. A hybrid's KV
    caches are allocated for all L positions at once (no growing copies)."""
    batch, length = inputs.shape
    cache = model.allocate_cache(batch, device=device, max_seqlen=length)
    logits = None
    for start in range(0, length, chunk_len):
        ids = torch.from_numpy(inputs[:, start:start + chunk_len]).long().to(device)  # (B, chunk)
        if autocast is not None:
            with autocast():
                logits = model(ids, cache=cache, logits_to_keep=1)
        else:
            logits = model(ids, cache=cache, logits_to_keep=1)
    return logits[:, -1, :VOCAB_SIZE].float()


@torch.no_grad()
def evaluate_length(model, seq_len: int, batch_size: int, n_batches: int, seed: int, device,
                    chunk_len: int = 8192, autocast=None) -> float:
    """Accuracy at the last position over n_batches held-out batches of length seq_len."""
    was_training = model.training
    model.eval()
    task, correct, total = InductionHeads(seq_len), 0, 0
    try:
        for i in range(n_batches):
            inputs, targets = task.batch_np(batch_size, seed, i, "eval")
            pred = last_logits_chunked(model, inputs, chunk_len, device, autocast).argmax(-1).cpu()
            correct += int((pred == torch.from_numpy(targets).long()).sum())
            total += batch_size
    finally:
        model.train(was_training)
    return correct / total


def evaluate_lengths(model, lengths: list[int], batch_size: int, n_batches: int, seed: int, device,
                     chunk_len: int = 8192, autocast=None, log=print, memory_budget: int | None = None,
                     time_budget: float | None = None) -> list[dict]:
    """One row per length: length, accuracy, seconds. A hybrid's rows also say the chunk length
    it ran with and the memory estimated for it (evaluation_memory); a length that does not fit
    memory_budget bytes (default: default_memory_budget) even in chunks of MIN_ATTENTION_CHUNK
    is not run: {"accuracy": None, "status": "not run: memory"}; one that runs out of memory all
    the same: "not run: oom", and the longer ones are not tried. With time_budget (seconds for
    the whole sweep), a length whose time, extrapolated from the last one run (quadratic with
    attention, linear without), would overrun it: "not run: time"."""
    rows = []
    attention = bool(attention_mixers(model))
    if attention and memory_budget is None:
        memory_budget = default_memory_budget(device)
    sweep_start, out_of_memory_at = time.perf_counter(), None
    for length in lengths:
        row, chunk = {"length": length}, chunk_len
        if out_of_memory_at is not None:
            rows.append({**row, "accuracy": None, "status": "not run: memory",
                         "detail": f"ran out of memory at length {out_of_memory_at}"})
            _log(log, f"length {length:>8}: not run: memory (ran out at length {out_of_memory_at})")
            continue
        if attention:
            chunk, estimate = fitting_chunk_len(model, length, batch_size, chunk_len, memory_budget, device, autocast)
            row.update(chunk_len=chunk, estimated_gib=round(estimate / 2**30, 3))
            if chunk is None:
                rows.append({**row, "accuracy": None, "status": "not run: memory",
                             "budget_gib": round(memory_budget / 2**30, 3)})
                _log(log, f"length {length:>8}: not run: memory (needs ~{_size(estimate)}, budget "
                          f"{_size(memory_budget)})")
                continue
        if time_budget is not None:
            spent = time.perf_counter() - sweep_start
            predicted = _predicted_seconds(rows, length, 2 if attention else 1)
            if spent + predicted > time_budget:
                rows.append({**row, "accuracy": None, "status": "not run: time",
                             "predicted_seconds": round(predicted, 1)})
                _log(log, f"length {length:>8}: not run: time (~{predicted:.0f} s predicted, "
                          f"{time_budget - spent:.0f} s of the budget left)")
                continue
        start = time.perf_counter()
        try:
            acc = evaluate_length(model, length, batch_size, n_batches, seed, device, chunk, autocast)
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not _is_out_of_memory(err):
                raise
            _free_memory(device)
            out_of_memory_at = length
            rows.append({**row, "accuracy": None, "status": "not run: oom"})
            _log(log, f"length {length:>8}: not run: oom ({str(err).splitlines()[0][:120]})")
            continue
        rows.append({**row, "accuracy": acc, "seconds": round(time.perf_counter() - start, 3)})
        _log(log, f"length {length:>8}: accuracy {acc:.3f} ({rows[-1]['seconds']:.1f} s)")
    return rows


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _log(log, line: str) -> None:
    if log is not None:
        log(line)


def _predicted_seconds(rows: list[dict], length: int, exponent: int) -> float:
    """The seconds `length` should take, from the last length that ran (0 before any)."""
    done = [r for r in rows if r.get("accuracy") is not None]
    if not done:
        return 0.0
    return done[-1]["seconds"] * (length / done[-1]["length"]) ** exponent


def _is_out_of_memory(err: RuntimeError) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(err)
    return isinstance(err, oom) or "out of memory" in text or "can't allocate memory" in text


def _free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- a hybrid's memory at long lengths -------------------------------------------------------

def attention_mixers(model) -> list:
    """The model's attention mixers (a hybrid's; none in a pure Mamba or S4D model)."""
    from ..modules.attention import Attention
    return [layer.mixer for layer in model.backbone.layers if isinstance(layer.mixer, Attention)]


def evaluation_memory(model, length: int, batch_size: int, chunk_len: int, device, autocast=None) -> int:
    """An upper estimate of the bytes that last_logits_chunked takes beyond the weights for a
    batch of `length` tokens, chunk_len at a time: the cache (every Mamba layer's state and every
    attention layer's keys and values for all `length` positions: model.allocate_cache on the
    meta device, so the sizes are the cache's own), and, at the last chunk, where it is largest,
    one attention layer's working set:
      - the cache's keys and values joined to the chunk's, and cast to the activations' dtype:
        2 · B · Hkv · L · head_dim · (cache bytes + activation bytes);
      - the visibility masks (bool) and the float bias SDPA makes of them, with a padded copy:
        B · chunk · L · (2 + 2 · activation bytes);
      - outside CUDA (whose fused kernels never hold them), the attention weights and their
        softmax in fp32: 2 · B · H · chunk · L · 4;
    and one chunk's activations through a Mamba layer (16 tensors of B · chunk · d_inner fp32)."""
    from ..modules.attention import AttentionState
    cache = model.allocate_cache(batch_size, device="meta", max_seqlen=length)
    chunk = min(chunk_len, length)
    activation_bytes = 2 if autocast is not None else 4
    fused = torch.device(device).type == "cuda"
    largest = 0
    kv_states = [state for state in cache.layers if isinstance(state, AttentionState)]
    for mixer, state in zip(attention_mixers(model), kv_states):
        kv_bytes = state.k.element_size()
        joined = 2 * batch_size * mixer.num_heads_kv * length * mixer.head_dim * (kv_bytes + activation_bytes)
        masks = batch_size * chunk * length * (2 + 2 * activation_bytes)
        weights = 0 if fused else 2 * batch_size * mixer.num_heads * chunk * length * 4
        largest = max(largest, joined + masks + weights)
    activations = 16 * batch_size * chunk * model.config.d_inner * 4
    return cache.nbytes() + largest + activations


def fitting_chunk_len(model, length: int, batch_size: int, chunk_len: int, budget: int, device, autocast=None
                      ) -> tuple[int | None, int]:
    """(the longest chunk, chunk_len halved until MIN_ATTENTION_CHUNK, whose evaluation_memory
    fits `budget` bytes, or None; that chunk's estimate, or the shortest's when none fits)."""
    chunk = min(chunk_len, length)
    while True:
        estimate = evaluation_memory(model, length, batch_size, chunk, device, autocast)
        if estimate <= budget:
            return chunk, estimate
        if chunk <= MIN_ATTENTION_CHUNK:
            return None, estimate
        chunk = max(MIN_ATTENTION_CHUNK, chunk // 2)


def default_memory_budget(device) -> int:
    """Bytes an evaluation may take: 80% of the GPU's free memory on CUDA, elsewhere half of
    the machine's memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): 8 GiB
        return 8 * 2**30


@torch.no_grad()
def retention_horizons(model, length: int = 1024, batch_size: int = 16, seed: int = 0, device=None,
                       top: int = 4) -> list[dict]:
    """How long each Mamba layer's most selective channels keep what they store, measured on
    held-out sequences of `length`. Per layer, the `top` channels with the largest ratio of
    Δ at the token to remember (just after the first trigger: the write) to the mean Δ over
    the other content tokens (the hold), each with its horizon 1 / (Δ_hold · min_n |A_n|):
    the number of steps over which its state decays by a factor e. A model extrapolates to
    length L only if some channel holds for well over L steps. One row per (layer, channel)."""
    from ..modules.mamba import Mamba
    was_training = model.training
    model.eval()
    inputs, _ = InductionHeads(length).batch_np(batch_size, seed, 0, "eval")
    first = (inputs[:, :-1] == TRIGGER).argmax(axis=1)  # (B,) the first trigger
    hold = np.ones(inputs.shape, dtype=bool)  # content tokens other than the one to remember
    rows_b = np.arange(batch_size)
    hold[rows_b, first] = hold[rows_b, first + 1] = False
    hold[:, -1] = False
    mixer_inputs = {}
    hooks = [layer.mixer.register_forward_pre_hook(
        lambda module, args, i=i: mixer_inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.backbone.layers) if isinstance(layer.mixer, Mamba)]
    try:
        model(torch.from_numpy(inputs).long().to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    hold_t = torch.from_numpy(hold)
    out = []
    for i, h in sorted(mixer_inputs.items()):
        mixer = model.backbone.layers[i].mixer
        delta = mixer.step_sizes(h.to(mixer.in_proj.weight.dtype)).cpu()  # (B, D_inner, L)
        write = delta[rows_b, :, first + 1].mean(0)  # (D_inner,)
        held = (delta * hold_t[:, None, :]).sum((0, 2)) / hold_t.sum()  # (D_inner,)
        a_min = mixer.A().abs().min(dim=1).values.cpu()  # (D_inner,)
        for d in (write / held).argsort(descending=True)[:top].tolist():
            out.append({"layer": i, "channel": d, "delta_write": write[d].item(), "delta_hold": held[d].item(),
                        "min_abs_A": a_min[d].item(), "horizon": 1.0 / (held[d].item() * a_min[d].item())})
    return out


def parse_lengths(text: str) -> list[int]:
    """"64..1048576" (every power of two in the range) or "64,256,1000" -> a list of lengths."""
    text = text.strip()
    if ".." in text:
        lo_s, hi_s = text.split("..", 1)
        try:
            lo, hi = int(lo_s), int(hi_s)
        except ValueError:
            raise ValueError(f"--lengths: expected LO..HI with ints, got {text!r}") from None
        if lo < 4 or hi < lo:
            raise ValueError(f"--lengths: need 4 <= LO <= HI, got {text!r}")
        out, p = [], 1
        while p <= hi:
            if p >= lo:
                out.append(p)
            p *= 2
        if not out:
            raise ValueError(f"--lengths: no power of two in {text!r}")
        return out
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--lengths: expected LO..HI or a comma-separated list of ints, got {text!r}") from None
    if not out or min(out) < 4:
        raise ValueError(f"--lengths: every length must be >= 4, got {text!r}")
    return out


def plot_lengths(rows: list[dict], path: Path, train_len: int | None, title: str,
                 series: dict[str, list[dict]] | None = None) -> None:
    """Accuracy against length (log2 x axis); `series` draws several models on one plot."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    for name, rs in (series or {title: rows}).items():
        ran = [r for r in rs if r.get("accuracy") is not None]  # a hybrid's lengths "not run" are left out
        ax.plot([r["length"] for r in ran], [r["accuracy"] for r in ran], marker="o", label=name)
    if train_len:
        ax.axvline(train_len, color="gray", ls="--", lw=0.8, label=f"train length {train_len}")
    ax.axhline(1 / N_CONTENT_TOKENS, color="gray", ls=":", lw=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="sequence length", ylabel="accuracy", ylim=(0, 1.02), title="induction heads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- training ----------------------------------------------------------------------------

def run(args, progress: bool = True):
    """Trains one model from parsed flags; returns (model, summary, per-step rows)."""
    from .fit import fit
    from .synthetic import autocast_for, build_model, fit_config, model_args, resolve_device, start, summary_base
    margs = model_args(args)
    task = InductionHeads(args.seq_len)
    device = resolve_device(args.device)
    model = build_model(margs, VOCAB_SIZE, device, args.seed)
    start("induction-heads", args, model, device, progress)
    autocast = autocast_for(device)
    batch_size = args.batch_size

    def batch_at(step):
        return task.batch(batch_size, args.seed, step, "train", device)

    def ev():
        return {"accuracy": evaluate_length(model, args.seq_len, batch_size, args.eval_batches, args.seed, device,
                                            autocast=autocast)}

    rows = fit(model, batch_at, loss_fn, fit_config(args), evaluate=ev, progress=progress, autocast=autocast)
    summary = summary_base("induction-heads", args, model, rows, device, rows[-1].get("accuracy"))
    return model, summary, rows


def build_train_parser() -> argparse.ArgumentParser:
    from .synthetic import add_common_flags
    parser = argparse.ArgumentParser(prog="mambakit train --task induction-heads",
                                     description=__doc__.split("\n\n")[0])
    add_common_flags(parser, seq_len=256, max_steps=2000, batch_size=64, lr=2e-3, out_dir="runs/induction-heads")
    parser.add_argument("--eval-lengths", default="",
                        help="after training, also evaluate at these lengths (as in mambakit eval --lengths)")
    return parser


def train_main(argv: list[str]) -> int:
    from .report import print_summary, save_run
    from .synthetic import autocast_for, describe_model, model_args, resolve_device
    args = build_train_parser().parse_args(argv)
    try:
        lengths = parse_lengths(args.eval_lengths) if args.eval_lengths else []
        InductionHeads(args.seq_len)
        model, summary, rows = run(args, progress=args.progress)
        if lengths:
            device = resolve_device(args.device)
            summary["lengths"] = evaluate_lengths(model, lengths, args.batch_size, args.eval_batches, args.seed,
                                                  device, autocast=autocast_for(device))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.out_dir:
        title = f"induction heads: {describe_model(model_args(args))}"
        save_run(args.out_dir, model, summary, rows, "accuracy", title)
        if lengths:
            plot_lengths(summary["lengths"], Path(args.out_dir) / "lengths.png", args.seq_len, title)
    print_summary(summary)
    return 0


# ---- evaluation --------------------------------------------------------------------------

def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit eval --task induction-heads",
                                     description="accuracy of a trained induction-heads model against length")
    parser.add_argument("--model", required=True, help="a model directory (mambakit train --task induction-heads)")
    parser.add_argument("--lengths", default="64..1048576", help="LO..HI (powers of two) or a list a,b,c")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--chunk-len", type=int, default=8192, help="tokens per forward; the state carries over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="a hybrid (attention layers): the memory its evaluation may take; longer lengths are "
                             "run in shorter chunks, and not at all ('not run: memory') when they cannot fit "
                             "(default: 80%% of the GPU's free memory, half of the machine's on CPU)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="skip ('not run: time') the lengths predicted to overrun this many seconds in all")
    parser.add_argument("--out", default=None, help="the JSON to write (default: MODEL/length_eval.json; "
                                                    "the plot goes beside it as .png)")
    return parser


def eval_main(argv: list[str]) -> int:
    from ..checkpoint import atomic_write_json
    from ..models.lm import MambaLM
    from .synthetic import autocast_for, resolve_device
    args = build_eval_parser().parse_args(argv)
    try:
        lengths = parse_lengths(args.lengths)
        for name in ("batch_size", "eval_batches", "chunk_len"):
            check_positive_int("--" + name.replace("_", "-"), getattr(args, name))
        for name in ("memory_budget_gib", "time_budget"):
            value = getattr(args, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        device = resolve_device(args.device)
        model = MambaLM.from_pretrained(args.model, device=device).eval()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    train_len = _train_len(Path(args.model))
    budget = None if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30)
    rows = evaluate_lengths(model, lengths, args.batch_size, args.eval_batches, args.seed, device,
                            args.chunk_len, autocast_for(device), memory_budget=budget, time_budget=args.time_budget)
    out = Path(args.out) if args.out else Path(args.model) / "length_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"task": "induction-heads", "model": str(args.model), "config": model.config.to_dict(),
              "train_len": train_len, "batch_size": args.batch_size, "eval_batches": args.eval_batches,
              "chunk_len": args.chunk_len, "device": str(device), "lengths": rows,
              # the step sizes behind the curve (empty for S4D, which has no selective channels)
              "retention": retention_horizons(model, length=1024, batch_size=args.batch_size, seed=args.seed,
                                              device=device)}
    atomic_write_json(out, result)
    cfg = model.config
    title = f"{cfg.layer}{'' if cfg.gate else ' (no gate)'}"
    if cfg.attn_layer_idx:
        title += f" + attention at {', '.join(map(str, cfg.attn_layer_idx))}"
    plot_lengths(rows, out.with_suffix(".png"), train_len, title)
    print(json.dumps({"accuracy": {r["length"]: r["accuracy"] for r in rows}, "json": str(out)}))
    return 0


def _train_len(model_dir: Path) -> int | None:
    """The training length from the run's metrics.json, when there is one."""
    try:
        with open(model_dir / "metrics.json") as f:
            return int(json.load(f)["summary"]["seq_len"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
