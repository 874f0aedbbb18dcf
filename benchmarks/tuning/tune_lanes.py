"""Sweep of the "lanes" scan kernels' shape on the device: NL (lanes over states) x warps x
pipeline stages, for the forward (no saved states) or, with --backward, the backward alone.

    python benchmarks/tuning/tune_lanes.py OUT.jsonl
    python benchmarks/tuning/tune_lanes.py OUT.jsonl --backward
    python benchmarks/tuning/tune_lanes.py OUT.jsonl --shapes 8x2048      # some of scan.py's shapes only
    python benchmarks/tuning/tune_lanes.py OUT.jsonl --prefetch           # default shapes, register prefetch off/on

The shapes and inputs are benchmarks/scan.py's; the official kernel's figures come side by side
from that script."""
import itertools, json, sys, torch
from pathlib import Path
from triton.testing import do_bench
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for scan.py
from scan import SHAPES, make_inputs
from mambakit.ops.triton.scan_launch import scan_bwd, scan_fwd

backward = "--backward" in sys.argv
shapes = SHAPES[:4] if backward else SHAPES
if "--shapes" in sys.argv:
    wanted = sys.argv[sys.argv.index("--shapes") + 1].split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in wanted]
out = open(sys.argv[1], "a")


def prefetch_sweep():
    """The default shapes with the forward's register prefetch of the next chunk off and on. (The
    backward's, measured with one chunk per saved state, was 13-40 % slower at every shape and
    is gone; the bwd_* columns of tuning/results/tune_lanes_prefetch_h200.jsonl are that run.)"""
    for batch, length in SHAPES:
        kw = make_inputs(batch, length)
        args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        fwd = lambda lanes: scan_fwd(*args, None, True, None, False, lanes=lanes)  # noqa: E731
        row = dict(B=batch, L=length)
        for prefetch in (False, True):
            row[f"fwd_ms_prefetch{int(prefetch)}"] = round(
                do_bench(lambda: fwd(dict(PREFETCH=prefetch)), warmup=5, rep=30), 4)
        out.write(json.dumps(row) + "\n"); out.flush()
        print(json.dumps(row), flush=True)


if "--prefetch" in sys.argv:
    prefetch_sweep()
    sys.exit(0)
for batch, length in shapes:
    kw = make_inputs(batch, length)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    if backward:
        _, _, states = scan_fwd(*args, None, True, None, True)
        dout = torch.randn_like(kw["u"])
        run = lambda lanes: scan_bwd(*args, None, True, states, dout, None, lanes=lanes)  # noqa: E731
    else:
        run = lambda lanes: scan_fwd(*args, None, True, None, False, lanes=lanes)  # noqa: E731
    rows = []
    for nl, warps, stages in itertools.product((2, 4, 8), (1, 2, 4) if backward else (1, 2),
                                               (1, 2) if backward else (1, 2, 3)):
        lanes = dict(NL=nl, BLOCK_D=(32 // nl) * warps, num_warps=warps, STAGES=stages)
        try:
            ms = do_bench(lambda: run(lanes), warmup=3 if backward else 5, rep=10 if backward else 20)
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
            print(lanes, "fail", type(e).__name__, str(e)[:200], flush=True)
            continue
        row = dict(B=batch, L=length, **lanes, **{"bwd_ms" if backward else "fwd_ms": round(ms, 4)})
        rows.append(row)
        out.write(json.dumps(row) + "\n"); out.flush()
    print("best", json.dumps(min(rows, key=lambda r: r["bwd_ms" if backward else "fwd_ms"])), flush=True)
