"""Sweeps the SSD kernels' knobs (ops/knobs.py: ssd_fwd_warps, ssd_bwd_warps, ssd_bwd_block) on the
GPU at two shapes of benchmarks/ssd.py, forward and forward+backward medians for each setting.

    python benchmarks/tuning/ssd_sweep.py [--shapes 8x2048x128 1x131072x64] [--out benchmarks/tuning/results/ssd_sweep.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    import torch
    from ssd import CHUNK, bench, make_inputs

    from mambakit.ops import knobs, ssd
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["8x2048x128", "1x131072x64"], help="B x L x N")
    ap.add_argument("--out", default="benchmarks/tuning/results/ssd_sweep.json")
    args = ap.parse_args()
    fn = lambda **kw: ssd(**kw, dt_softplus=True, chunk_size=CHUNK, backend="triton")  # noqa: E731
    rows = []
    for shape in args.shapes:
        batch, length, d_state = (int(v) for v in shape.split("x"))
        kw = make_inputs(batch, length, d_state)
        for fwd_warps, bwd_warps, block in itertools.product((4, 8), (4, 8), (32, 64)):
            with knobs.override(ssd_fwd_warps=fwd_warps, ssd_bwd_warps=bwd_warps, ssd_bwd_block=block):
                row = {"shape": shape, "fwd_warps": fwd_warps, "bwd_warps": bwd_warps, "bwd_block": block,
                       "fwd_ms": bench(fn, kw, backward=False), "fwdbwd_ms": bench(fn, kw, backward=True)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del kw
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
