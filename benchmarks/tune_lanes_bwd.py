"""Sweep of the "lanes" backward kernel's shape on the device (the backward alone).

    python benchmarks/tune_lanes_bwd.py OUT.jsonl
"""
import itertools, json, sys, torch
from triton.testing import do_bench
sys.path.insert(0, "benchmarks")
from scan import make_inputs
from mambakit.ops.triton.selective_scan import scan_bwd, scan_fwd

out = open(sys.argv[1], "a")
for batch, length in ((16, 512), (8, 2048), (2, 8192), (1, 32768)):
    kw = make_inputs(batch, length)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    _, _, states = scan_fwd(*args, None, True, None, True)
    dout = torch.randn_like(kw["u"])
    rows = []
    for nl, warps, stages in itertools.product((2, 4, 8), (1, 2, 4), (1, 2)):
        lanes = dict(NL=nl, BLOCK_D=(32 // nl) * warps, num_warps=warps, STAGES=stages)
        try:
            ms = do_bench(lambda: scan_bwd(*args, None, True, states, dout, None, lanes=lanes), warmup=3, rep=10)
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
            print(lanes, "fail", type(e).__name__, str(e)[:200], flush=True)
            continue
        row = dict(B=batch, L=length, **lanes, bwd_ms=round(ms, 4))
        rows.append(row)
        out.write(json.dumps(row) + "\n"); out.flush()
    print("best", json.dumps(min(rows, key=lambda r: r["bwd_ms"])), flush=True)
