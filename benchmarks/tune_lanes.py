"""Sweep of the "lanes" forward kernel's shape on the device (forward only, no saved states).

    python benchmarks/tune_lanes.py OUT.jsonl

For each benchmark shape it times NL (lanes over states) x warps x pipeline stages. Official figures are in ../shared/GUIDE.md and
come side by side from benchmarks/scan.py."""
import itertools, json, sys, torch
from triton.testing import do_bench
sys.path.insert(0, "benchmarks")
from scan import SHAPES, make_inputs
from mambakit.ops.triton.selective_scan import scan_fwd

out = open(sys.argv[1], "a")
for batch, length in SHAPES:
    kw = make_inputs(batch, length)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    rows = []
    for nl, warps, stages in itertools.product((2, 4, 8), (1, 2), (1, 2, 3)):
        block_d = (32 // nl) * warps
        lanes = dict(NL=nl, BLOCK_D=block_d, num_warps=warps, STAGES=stages)
        try:
            ms = do_bench(lambda: scan_fwd(*args, None, True, None, False, lanes=lanes), warmup=5, rep=20)
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
            print(lanes, "fail", type(e).__name__, str(e)[:200], flush=True)
            continue
        row = dict(B=batch, L=length, **lanes, fwd_ms=round(ms, 4))
        rows.append(row)
        out.write(json.dumps(row) + "\n"); out.flush()
    best = min(rows, key=lambda r: r["fwd_ms"])
    print("best", json.dumps(best), flush=True)
