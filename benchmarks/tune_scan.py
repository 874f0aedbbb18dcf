"""Block-size sweep of the Triton scan kernels on the device (forward, and backward alone).

    python benchmarks/tune_scan.py OUT.json                                  # the tile3d kernels
    MAMBAKIT_SCAN_KERNEL=by_state python benchmarks/tune_scan.py OUT.json    # the by-state kernels
"""
import itertools, json, os, sys, torch
from triton.testing import do_bench
sys.path.insert(0, "benchmarks")
from scan import make_inputs
from mambakit.ops.triton.selective_scan import scan_fwd, scan_bwd
out = []
for batch, length in ((8, 2048), (1, 32768)):
    kw = make_inputs(batch, length)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    by_state = os.environ.get("MAMBAKIT_SCAN_KERNEL") == "by_state"
    grid = (itertools.product((1, 2, 4), (128, 256, 512), (2, 4, 8)) if by_state
            else itertools.product((8, 16, 32), (8, 16), (1, 2)))
    for bd, bl, nw in grid:
        if not by_state and bd * bl * 16 > 32768:
            continue
        try:
            f = do_bench(lambda: scan_fwd(*args, None, True, None, False, block_l=bl, block_d=bd, num_warps=nw), warmup=5, rep=20)
            _, _, st = scan_fwd(*args, None, True, None, True, block_l=bl, block_d=bd, num_warps=nw)
            dout = torch.randn_like(kw["u"])
            b = do_bench(lambda: scan_bwd(*args, None, True, st, dout, None, block_l=bl, block_d=bd, num_warps=nw), warmup=3, rep=10)
        except Exception as e:
            print(bd, bl, nw, "fail", type(e).__name__, flush=True); continue
        row = dict(B=batch, L=length, block_d=bd, block_l=bl, warps=nw, fwd_ms=f, bwd_ms=b)
        out.append(row); print(json.dumps(row), flush=True)
        open(sys.argv[1] + "l", "a").write(json.dumps(row) + "\n")
json.dump(out, open(sys.argv[1], "w"), indent=1)
for shape in ((8, 2048), (1, 32768)):
    rows = [r for r in out if (r["B"], r["L"]) == shape]
    print("best fwd", shape, min(rows, key=lambda r: r["fwd_ms"]))
    print("best bwd", shape, min(rows, key=lambda r: r["bwd_ms"]))
