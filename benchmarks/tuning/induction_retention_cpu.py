"""Why induction heads stop extrapolating, measured on CPU at a small scale: trains the paper's
2-layer, d_model 64 Mamba at length 64 (weight decay 0.1, then 0), evaluates it at 64..32768
tokens, and reads the step sizes of its most selective channels (`retention_horizons`: Δ at
the token to remember, Δ at the other tokens, and the horizon 1 / (Δ_hold · min |A|) over
which a channel's memory decays by e). About 7 minutes on 2 cores.

    python benchmarks/tuning/induction_retention_cpu.py     # weight decay 0.1, then 0
    python benchmarks/tuning/induction_retention_cpu.py --lr 5e-4 --steps 3000 --weight-decay 0.1
    python benchmarks/tuning/induction_retention_cpu.py --lr 1e-3 --min-lr-ratio 1 --warmup-steps 100 \
        --weight-decay 0 --steps 1500

Every invocation adds its runs, each with the command that made it, to one file
(benchmarks/tuning/results/induction_retention_cpu.json by default), replacing the runs of an
earlier invocation with the same command.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from mambakit.tasks import induction_heads as ih  # noqa: E402

TRAIN_LEN, STEPS, BATCH, LR = 64, 1500, 32, 2e-3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--weight-decay", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="1: a constant lr after warmup")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "induction_retention_cpu.json"))
    opts = p.parse_args()
    torch.set_num_threads(2)
    out = Path(opts.out)
    command = "python benchmarks/tuning/induction_retention_cpu.py" + "".join(f" {a}" for a in sys.argv[1:])
    runs = []
    for wd in opts.weight_decay:
        args = ih.build_train_parser().parse_args([
            "--seq-len", str(TRAIN_LEN), "--max-steps", str(opts.steps), "--batch-size", str(BATCH), "--lr", str(opts.lr),
            "--weight-decay", str(wd), "--min-lr-ratio", str(opts.min_lr_ratio),
            *(["--warmup-steps", str(opts.warmup_steps)] if opts.warmup_steps is not None else []), "--device", "cpu", "--out-dir", "", "--eval-every", "100000", "--no-progress"])
        start = time.perf_counter()
        model, summary, rows = ih.run(args, progress=False)
        lengths = ih.evaluate_lengths(model, [TRAIN_LEN * 2 ** k for k in range(10)], 16, 2, 0, torch.device("cpu"),
                                      chunk_len=4096, log=None)
        retention = ih.retention_horizons(model, length=1024, batch_size=16)
        run = {"command": command, "weight_decay": wd, "train_len": TRAIN_LEN, "steps": opts.steps, "batch_size": BATCH, "lr": opts.lr,
               "min_lr_ratio": opts.min_lr_ratio, "warmup_steps": args.warmup_steps,
               "final_loss": rows[-1]["loss"], "train_accuracy": summary["accuracy"],
               "seconds": round(time.perf_counter() - start, 1), "lengths": lengths, "retention": retention}
        print(json.dumps({k: run[k] for k in ("weight_decay", "final_loss", "seconds")}), flush=True)
        print("  accuracy:", [(r["length"], r["accuracy"]) for r in lengths], flush=True)
        for r in retention:
            print(f"  layer {r['layer']} channel {r['channel']}: Δ write {r['delta_write']:.3g}, "
                  f"hold {r['delta_hold']:.3g}, horizon {r['horizon']:.3g} steps", flush=True)
        runs.append(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(out.read_text())["runs"] if out.exists() else []
    runs = [r for r in earlier if r.get("command") != command] + runs
    out.write_text(json.dumps({"benchmark": "induction_retention_cpu", "torch": torch.__version__, "runs": runs},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
