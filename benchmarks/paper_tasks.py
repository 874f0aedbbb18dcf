"""The Mamba paper's synthetic tasks (Gu & Dao 2023, Table 1 and Table 2 / Figure 2), small.

(a) Selective copying, the four Table 1 variants: S4 without gate, S6 without gate, "Mamba with
    S4" (the gated block with S4D), Mamba (gated S6); d_model 64, 2 layers, length 4096, 16
    tokens to memorize. Reported: per-token accuracy on the answers.
(b) Induction heads: a 2-layer, d_model 64 Mamba (~74K parameters) trained at length 256 and
    evaluated at every power of two 2^6..2^20 (each sequence chunk by chunk with the recurrent
    state carried, so memory stays flat), beside the same model with S4D.
(c) The hybrid row in both: the same 2-layer, d_model 64 model with layer 1 causal attention
    (2 heads, rotary on half of each head's channels: synthetic.hybrid_attn_cfg) after a gated
    Mamba layer. Its KV cache grows with the length and every token attends to all of it, so its
    long-length evaluation runs in shorter chunks to fit a memory budget, and records a length
    that cannot fit (or would overrun a time budget) as "not run: memory" ("not run: time")
    with accuracy null (induction_heads.evaluate_lengths).

The full run is sized for one 10-minute device call with --jobs 8 (the eight trainings at once,
one process each; every training also has a time limit, so a slower device stops early rather
than overrunning, and "steps_run" says what was done).

    python benchmarks/paper_tasks.py --jobs 8             # writes benchmarks/results/paper_tasks_h200.json + .png
    python benchmarks/paper_tasks.py --only copying       # ... paper_tasks_copying_h200.json + .png
    python benchmarks/paper_tasks.py --only induction     # ... paper_tasks_induction_h200.json + .png
    python benchmarks/paper_tasks.py --steps-scale 0.1    # a shorter run
    python benchmarks/paper_tasks.py --only induction --layer mamba --set induction.lr=5e-4   # one setting changed
    python benchmarks/paper_tasks.py --layer hybrid --jobs 2    # the hybrid rows only: ... paper_tasks_hybrid_h200.json
    python benchmarks/paper_tasks.py --only induction --layer mamba --state-dir runs/ind \
        --set induction.steps=204800     # longer than one call: run again to continue where it stopped
    python benchmarks/paper_tasks.py --smoke              # CPU, tiny steps and lengths, ~1 minute
    python benchmarks/paper_tasks.py --plot benchmarks/results/induction_long_h200.json   # redraw a PNG

A result with a "calls" list (one training continued over several invocations with --state-dir,
each invocation's evaluation kept) is drawn as one accuracy curve per invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambakit.tasks import induction_heads as ih  # noqa: E402
from mambakit.tasks import selective_copying as sc  # noqa: E402
from mambakit.tasks.synthetic import autocast_for, hybrid_attn_cfg, resolve_device  # noqa: E402

HYBRID = "Hybrid (Mamba + 1 attention layer)"
VARIANTS = [  # (name, kind, gate): the paper's Table 1 rows, and the hybrid
    ("S4 (no gate)", "s4d", False),
    ("S6 (no gate)", "mamba", False),
    ("Mamba with S4 (gated S4D)", "s4d", True),
    ("Mamba (gated S6)", "mamba", True),
    (HYBRID, "hybrid", True),
]
INDUCTION_VARIANTS = [("Mamba", "mamba"), ("S4D (gated)", "s4d"), (HYBRID, "hybrid")]
KINDS = ("mamba", "s4d", "hybrid")  # --layer: a mixer, or the hybrid (a gated Mamba layer, then attention)
D_MODEL, N_LAYER = 64, 2  # every variant's size
HYBRID_ATTN_LAYER = 1  # of the 2 layers: attention after the Mamba layer (which can mark the token after a trigger)


def model_flags(kind: str, gate: bool) -> list[str]:
    """The task flags of a variant: its mixer and gate, and a hybrid's attention layer (its
    settings: synthetic.hybrid_attn_cfg, written out)."""
    flags = ["--layer", "mamba" if kind == "hybrid" else kind, "--gate" if gate else "--no-gate"]
    if kind == "hybrid":
        flags += ["--attn-layers", str(HYBRID_ATTN_LAYER), "--attn-cfg", json.dumps(hybrid_attn_cfg(D_MODEL))]
    return flags


# The full run: (steps, batch, lr, time limit in s) per training, as measured on one H200 (about
# 15 ms a copying step at L=4096 x 32, evaluations included; 1-2 s per model for the 1M-token
# evaluation). Selective copying: 6000 steps at L=4096 throughout left S6 at 0.16 (the paper
# trains 400K steps), so it trains 16000 steps with a length curriculum (--curriculum-from 256:
# lengths 256..2048 over the first half of the steps, then 4096; every evaluation is at 4096).
# Induction heads: the sweep in benchmarks/tuning/results/induction_sweep_h200.json found weight
# decay the main limit on extrapolation (decay pulls the dt projection back, so the step sizes at
# the tokens to hold stay large): with none and a constant lr of 1e-3 after warmup, ~26K steps
# held 0.97 at 64K tokens and 0.56-0.66 at 1M, against 0.03 at 1M with decay 0.1. So induction
# trains that way until its time limit (60K steps is the schedule's length, not a target).
# The hybrid trains with the same settings. Its evaluation at long lengths costs memory and time
# that grow with the square of the length (every token attends to the whole KV cache), so it
# has budgets of its own: hybrid_memory_gib (the chunks shrink to fit, and a length that cannot
# fit is "not run: memory") and hybrid_eval_seconds per precision (a length whose time,
# extrapolated quadratically, would overrun it is "not run: time"), so that training + both
# evaluations stay within the call.
FULL = {
    "copy": dict(seq_len=4096, n_memorize=16, steps=16000, batch=32, lr=3e-3, weight_decay=0.1, min_lr_ratio=0.1,
                 limit=440, eval_batches=8, curriculum_from=256),
    "induction": dict(seq_len=256, steps=60000, batch=64, lr=1e-3, weight_decay=0.0, min_lr_ratio=1.0,
                      limit=440, eval_batches=8,
                      lengths="64..1048576", eval_batch=16, eval_rounds=2, chunk_len=16384,
                      hybrid_memory_gib=24.0, hybrid_eval_seconds=30.0),
}
SMOKE = {
    "copy": dict(seq_len=128, n_memorize=8, steps=20, batch=8, lr=2e-3, weight_decay=0.1, min_lr_ratio=0.1,
                 limit=60, eval_batches=2),
    "induction": dict(seq_len=32, steps=20, batch=8, lr=2e-3, weight_decay=0.1, min_lr_ratio=0.1, limit=60,
                      eval_batches=2,
                      lengths="16..1024", eval_batch=4, eval_rounds=1, chunk_len=256,
                      # small enough that the smoke run shows the longest lengths "not run: memory"
                      hybrid_memory_gib=0.01, hybrid_eval_seconds=30.0),
}


def state_argv(state_dir: str | None, part: str, name: str) -> list[str]:
    """With --state-dir: the variant's resumable training state in its own folder, saved every
    1000 steps and at the time limit, and resumed when one is there (so a training longer than
    one device call runs over several calls with the same command)."""
    if not state_dir:
        return []
    from mambakit.tasks.synthetic import STATE_FILE
    folder = Path(state_dir) / f"{part}_{''.join(ch if ch.isalnum() else '_' for ch in name).strip('_')}"
    return ["--out-dir", str(folder), "--save-every", "1000"] + (["--resume"] if (folder / STATE_FILE).exists() else [])


def task_argv(common: list[str], c: dict, steps_scale: float) -> list[str]:
    steps = max(1, round(c["steps"] * steps_scale))
    return common + ["--seq-len", str(c["seq_len"]), "--max-steps", str(steps), "--batch-size", str(c["batch"]),
                     "--lr", str(c["lr"]), "--weight-decay", str(c["weight_decay"]),
                     "--min-lr-ratio", str(c["min_lr_ratio"]), "--eval-batches", str(c["eval_batches"]),
                     "--eval-every", str(max(1, steps // 5)), "--time-limit", str(c["limit"]), "--out-dir", ""]


def train_copying_variant(c: dict, common: list[str], steps_scale: float, progress: bool,
                          name: str, kind: str, gate: bool, state_dir: str | None = None) -> dict:
    """One Table 1 row (or the hybrid's): trains the variant, returns its summary (with the
    accuracy curve). Evaluated at the training length."""
    argv = task_argv(common, c, steps_scale) + state_argv(state_dir, "copy", name) + model_flags(kind, gate) + [
        "--n-memorize", str(c["n_memorize"])]
    if c.get("curriculum_from"):
        argv += ["--curriculum-from", str(c["curriculum_from"])]
    _, summary, rows = sc.run(sc.build_parser().parse_args(argv), progress=progress)
    summary["name"] = name
    summary["curve"] = [{k: r[k] for k in ("step", "loss", "accuracy") if k in r} for r in rows if "accuracy" in r]
    print(f"selective copying  {name:<28} accuracy {summary['accuracy']:.3f}  "
          f"({summary['steps_run']} steps, {summary['seconds']:.0f} s, {summary['n_params']} params)", flush=True)
    return summary


def train_induction_variant(c: dict, common: list[str], steps_scale: float, progress: bool,
                            name: str, kind: str, state_dir: str | None = None) -> dict:
    """Trains one induction model at c["seq_len"], then evaluates it at every length, with bf16
    autocast (as trained) and in fp32 (to tell numerics from the model's own retention). The
    hybrid's evaluation has its memory and time budgets (c["hybrid_memory_gib"],
    c["hybrid_eval_seconds"] per precision): the lengths beyond them are "not run"."""
    argv = task_argv(common, c, steps_scale) + state_argv(state_dir, "induction", name) + model_flags(kind, True)
    args = ih.build_train_parser().parse_args(argv)
    device = resolve_device(args.device)
    model, summary, rows = ih.run(args, progress=progress)
    summary["name"] = name
    print(f"induction heads    {name:<12} train-length accuracy {summary['accuracy']:.3f} "
          f"({summary['steps_run']} steps, {summary['seconds']:.0f} s, {summary['n_params']} params)", flush=True)
    lengths = ih.parse_lengths(c["lengths"])
    budgets = {}
    if kind == "hybrid":
        budgets = dict(memory_budget=int(c["hybrid_memory_gib"] * 2**30), time_budget=c["hybrid_eval_seconds"])
        summary.update(hybrid_memory_gib=c["hybrid_memory_gib"], hybrid_eval_seconds=c["hybrid_eval_seconds"])
    for key, autocast in (("lengths", autocast_for(device)), ("lengths_fp32", None)):
        start = time.perf_counter()
        summary[key] = ih.evaluate_lengths(
            model, lengths, c["eval_batch"], c["eval_rounds"], args.seed, device, chunk_len=c["chunk_len"],
            autocast=autocast, log=lambda line, tag=key: print(f"  {name} {tag}: {line}", flush=True), **budgets)
        summary[key.replace("lengths", "eval_seconds")] = round(time.perf_counter() - start, 1)
        if autocast is None:  # on CPU the two evaluations are the same
            break
    # the step sizes behind the curve: how long the most selective channels hold (ih.retention_horizons)
    summary["retention"] = ih.retention_horizons(model, length=1024, batch_size=16, seed=args.seed, device=device)
    for r in summary["retention"]:
        print(f"  {name} layer {r['layer']} channel {r['channel']}: Δ write {r['delta_write']:.3g}, "
              f"hold {r['delta_hold']:.3g}, horizon {r['horizon']:.3g} steps", flush=True)
    summary["curve"] = [{k: r[k] for k in ("step", "loss", "accuracy") if k in r} for r in rows if "accuracy" in r]
    return summary


def run_jobs(calls: list[tuple], jobs: int) -> list[dict]:
    """Runs each (function, *args) and returns the results in order: one after another with
    jobs == 1, otherwise in up to `jobs` processes at once (each trains its own small model; on
    one GPU they fill each other's gaps, since a d_model-64 model leaves it mostly idle)."""
    if jobs <= 1:
        return [_guarded(fn, *args) for fn, *args in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_guarded, fn, *args) for fn, *args in calls]
        return [f.result() for f in futures]


def _guarded(fn, c, common, steps_scale, progress, name, *rest) -> dict:
    """fn's summary, or a summary that records its error: one failed training must not lose
    the others' results."""
    try:
        return fn(c, common, steps_scale, progress, name, *rest)
    except Exception as err:  # noqa: BLE001 (recorded in the JSON and reported by main)
        import traceback
        traceback.print_exc()
        task = "selective-copying" if fn is train_copying_variant else "induction-heads"
        return {"task": task, "name": name, "error": f"{type(err).__name__}: {err}"}


def plot_calls(result: dict, path: Path) -> None:
    """One training continued over several invocations: its accuracy against test length at the
    end of each invocation (result["calls"], bf16 evaluation)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for call in result["calls"]:
        lengths = sorted(call["accuracy_bf16"], key=int)
        ax.plot([int(n) for n in lengths], [call["accuracy_bf16"][n] for n in lengths], marker="o",
                label=f"{call['steps_run']:,} steps")
    train_len = result.get("sizes", {}).get("induction", {}).get("seq_len", 256)
    ax.axvline(train_len, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"test length (trained at {train_len})")
    ax.set_ylabel("accuracy (32 sequences, bf16)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Induction heads, Mamba 2 x 64: one training, after each invocation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(result: dict, path: Path) -> None:
    if result.get("calls"):
        plot_calls(result, path)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    copy = [r for r in result.get("selective_copying", []) if "error" not in r]
    ind = [r for r in result.get("induction_heads", []) if "error" not in r]
    panels = [part for part, rows in (("copy", copy), ("induction", ind)) if rows] or ["copy", "induction"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    copy_ax, ind_ax = (dict(zip(panels, axes[0])).get(part) for part in ("copy", "induction"))
    if copy:
        names = [r["name"] for r in copy]
        accs = [r["accuracy"] for r in copy]
        colors = dict(zip([v[0] for v in VARIANTS], ["tab:gray", "tab:blue", "tab:olive", "tab:green"]))
        bars = copy_ax.barh(names, accs, color=[colors.get(n, "tab:purple") for n in names])
        for bar, acc in zip(bars, accs):
            copy_ax.text(min(acc + 0.01, 0.9), bar.get_y() + bar.get_height() / 2, f"{acc:.1%}", va="center")
        copy_ax.set(xlim=(0, 1), xlabel="accuracy on the answers",
                    title=f"selective copying, L={copy[0]['seq_len']}, {copy[0]['n_memorize']} tokens")
        copy_ax.invert_yaxis()
    for r in ind:
        ran, not_run = _ran(r["lengths"]), [x for x in r["lengths"] if x.get("accuracy") is None]
        line, = ind_ax.plot([x["length"] for x in ran], [x["accuracy"] for x in ran], marker="o",
                           label=f"{r['name']} ({r['n_params'] / 1e3:.0f}K)")
        if not_run:  # a hybrid's lengths beyond its memory or time budget: crosses on the axis
            why = ", ".join(sorted({x["status"].removeprefix("not run: ") for x in not_run}))
            ind_ax.plot([x["length"] for x in not_run], [0.0] * len(not_run), ls="none", marker="x", ms=8,
                       clip_on=False, color=line.get_color(), label=f"{r['name']}: not run ({why})")
        if "lengths_fp32" in r:
            ind_ax.plot([x["length"] for x in _ran(r["lengths_fp32"])], [x["accuracy"] for x in _ran(r["lengths_fp32"])],
                       ls="--", marker=".", color=line.get_color(), label=f"{r['name']}, fp32 evaluation")
    if ind:
        ind_ax.axvline(ind[0]["seq_len"], color="gray", ls="--", lw=0.8, label="train length")
        ind_ax.axhline(1 / ih.N_CONTENT_TOKENS, color="gray", ls=":", lw=0.8, label="chance")
        ind_ax.set_xscale("log", base=2)
        ind_ax.set(ylim=(0, 1.02), xlabel="test sequence length", ylabel="accuracy", title="induction heads")
        ind_ax.legend(fontsize=8)
    for a in axes[0]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ran(rows: list[dict]) -> list[dict]:
    """The length rows that were run (a hybrid's "not run" rows have accuracy None)."""
    return [x for x in rows if x.get("accuracy") is not None]


def apply_overrides(sizes: dict, settings: list[str]) -> dict:
    """A copy of `sizes` with each "part.key=value" applied (value parsed as the type it replaces)."""
    sizes = {part: dict(c) for part, c in sizes.items()}
    for item in settings:
        name, sep, value = item.partition("=")
        part, dot, key = name.partition(".")
        if not sep or not dot or part not in sizes or key not in sizes[part]:
            known = ", ".join(f"{p}.{k}" for p, c in sizes.items() for k in c)
            raise SystemExit(f"error: --set {item!r}: expected PART.KEY=VALUE with one of: {known}")
        old = sizes[part][key]
        try:
            if isinstance(old, int):  # 20000 or 2e4, but not 2.5
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                sizes[part][key] = int(number)
            elif isinstance(old, float):
                sizes[part][key] = float(value)
            else:
                sizes[part][key] = value
        except ValueError:
            raise SystemExit(f"error: --set {item!r}: {value!r} is not a {type(old).__name__}") from None
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny steps and lengths")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count (e.g. 0.05)")
    p.add_argument("--only", choices=["copying", "induction"], default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: auto, cpu with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: benchmarks/results/paper_tasks[_ONLY]_h200.json "
                                               "(runs/paper_tasks_smoke.json with --smoke)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--layer", choices=KINDS, default=None,
                   help="train only the variants with this mixer, or the hybrid rows (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="PART.KEY=VALUE",
                   help="override one setting of the run, e.g. induction.lr=5e-4 or copy.steps=20000 "
                        "(PART is copy or induction; repeatable)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train up to this many models at once, each in its own process (default 1)")
    p.add_argument("--state-dir", default=None,
                   help="keep each model's resumable training state here and continue it when present: "
                        "a training longer than its time limit goes on in the next call of the same command")
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result")
    args = p.parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    if not args.steps_scale > 0:
        raise SystemExit(f"error: --steps-scale must be > 0, got {args.steps_scale}")
    sizes = apply_overrides(SMOKE if args.smoke else FULL, args.set)
    device = resolve_device(args.device or ("cpu" if args.smoke else "auto"))
    root = Path(__file__).resolve().parents[1]
    default = (root / "runs" / "paper_tasks_smoke.json" if args.smoke
               else root / "benchmarks" / "results" /
               f"paper_tasks{'_' + args.only if args.only else ''}{'_' + args.layer if args.layer else ''}"
               f"{'_custom' if args.set else ''}_h200.json")
    out = Path(args.out) if args.out else default
    common = ["--d-model", str(D_MODEL), "--n-layer", str(N_LAYER), "--device", str(device), "--seed", str(args.seed)]
    result = {"benchmark": "paper_tasks", "smoke": args.smoke, "steps_scale": args.steps_scale,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "sizes": sizes}
    start = time.perf_counter()
    calls = []
    if args.only in (None, "copying"):
        calls += [(train_copying_variant, sizes["copy"], common, args.steps_scale, args.progress, name, kind, gate,
                   args.state_dir) for name, kind, gate in VARIANTS if args.layer in (None, kind)]
    if args.only in (None, "induction"):
        calls += [(train_induction_variant, sizes["induction"], common, args.steps_scale, args.progress, name, kind,
                   args.state_dir) for name, kind in INDUCTION_VARIANTS if args.layer in (None, kind)]
    for summary in run_jobs(calls, args.jobs):
        key = "selective_copying" if summary["task"] == "selective-copying" else "induction_heads"
        result.setdefault(key, []).append(summary)
    failed = [f"{r['name']}: {r['error']}" for part in ("selective_copying", "induction_heads")
              for r in result.get(part, []) if "error" in r]
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"total {result['total_seconds']:.0f} s; wrote {out} and {out.with_suffix('.png')}")
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
