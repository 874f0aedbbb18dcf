"""Genome or k-mer sample? Held-out accuracy against window length for the three DNA classifiers.

For each window length (1k to 1M bases) and backbone (causal Mamba, bidirectional Mamba, and the
RC-equivariant bidirectional Mamba of Caduceus), train `mambakit train --task dna-classify`'s
classifier (mambakit/tasks/dna/classify.py: real genome windows against samples of an order-k
Markov model fitted on the same records) with the same number of bases seen at every length,
then score it on the held-out strain's windows against that strain's Markov samples. Reported per
run: accuracy, the RC agreement (the fraction of windows classified as their reverse complement
is), ms per step and, on CUDA, the peak memory.

    python benchmarks/dna_classify.py --data GENOMES [--lengths 1024 4096 ... 1048576]
        [--out benchmarks/results/dna_classify_h200.json]
    python benchmarks/dna_classify.py --data GENOMES --smoke    # CPU, tiny sizes: the script runs
    python benchmarks/dna_classify.py --plot benchmarks/results/dna_classify_cpu.json

GENOMES: FASTA files or directories (e.g. the kleborate-examples assemblies); the last file is held out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambakit.tasks.dna import classify  # noqa: E402

BACKBONES = ("causal", "bidirectional", "rc")
LABELS = {"causal": "causal Mamba", "bidirectional": "bidirectional Mamba", "rc": "RC-equivariant (Caduceus)"}


def run_one(args, length: int, backbone: str, samplers: dict) -> dict:
    """One classifier trained and scored at one window length (the data and the Markov chains
    shared with the other backbones' runs through `samplers`)."""
    batch = max(1, args.tokens_per_step // length)
    steps = max(1, args.tokens_per_run // (batch * length))
    eval_batches = max(1, args.eval_windows // batch)
    flags = ["--data", *args.data, "--seq-len", str(length), "--batch-size", str(batch), "--max-steps", str(steps),
             "--backbone", backbone, "--d-model", str(args.d_model), "--n-layer", str(args.n_layer),
             "--d-state", str(args.d_state), "--lr", str(args.lr), "--eval-batches", str(eval_batches),
             "--eval-every", str(steps), "--markov-order", str(args.markov_order), "--device", args.device,
             "--out-dir", "", "--no-progress"]
    parsed = classify.build_train_parser().parse_args(flags)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, train, held = classify.shared_samplers(parsed, samplers)
    train.chains(), held.chains()  # drawn before the clock starts, once per length
    prepare_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, summary, _ = classify.run(parsed, progress=False, samplers=samplers)
    seconds = time.perf_counter() - start
    return {"backbone": backbone, "length": length, "batch": batch, "steps": steps, "bases": batch * length * steps,
            "accuracy": summary["accuracy"], "rc_agreement": summary["rc_agreement"],
            "held_out_windows": summary["held_out_windows"], "seconds": round(seconds, 2),
            "prepare_seconds": round(prepare_seconds, 2),
            "ms_per_step": seconds / steps * 1e3, "params": summary["n_params"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for backbone in BACKBONES:
        rows = [r for r in result["rows"] if r["backbone"] == backbone and r.get("accuracy") is not None]
        if rows:
            ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], "o-", label=LABELS[backbone])
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window length (bases)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"genome vs order-{result['settings']['markov_order']} Markov samples, {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", help="FASTA/FASTQ files or directories (the last file is held out)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2**k for k in (10, 12, 14, 16, 18, 20)])
    ap.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    ap.add_argument("--tokens-per-run", type=int, default=2**26, help="bases seen by each training")
    ap.add_argument("--tokens-per-step", type=int, default=2**18, help="bases per step (batch = this / length)")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows per class mix, at least one batch")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--markov-order", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--out", default="benchmarks/results/dna_classify_h200.json")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result")
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    if not args.data:
        ap.error("--data is required (FASTA files or directories)")
    if args.smoke:
        args.lengths, args.tokens_per_run, args.tokens_per_step, args.eval_windows = [64, 256], 8192, 2048, 16
        args.d_model, args.n_layer, args.device = 16, 1, "cpu"
        if args.out == ap.get_default("out"):
            args.out = "runs/dna_classify_smoke.json"
    rows = []
    for length in args.lengths:
        samplers = {}  # one draw of the chains per length, for every backbone
        for backbone in args.backbones:
            try:
                row = run_one(args, length, backbone, samplers)
            except torch.OutOfMemoryError:
                row = {"backbone": backbone, "length": length, "accuracy": None, "note": "out of memory"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = save(args, rows)  # after every row: a run cut short keeps what it measured
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out = Path(args.out)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def save(args, rows) -> dict:
    """Write the result so far to args.out and return it."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    result = {"benchmark": "dna_classify", "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "data": [str(p) for p in args.data], "settings": {
                  k: getattr(args, k) for k in ("tokens_per_run", "tokens_per_step", "eval_windows", "d_model",
                                                "n_layer", "d_state", "lr", "markov_order")}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
