"""The Gluon scan (ops/triton/scan_gluon.py) against the Triton lanes scan at Vim-Ti's padded
shape on the device, both directions as the padded path calls them (ms a call, do_bench), with
and without loading each chunk's inputs an iteration ahead.

    python benchmarks/tuning/tune_gluon_scan.py [--batch 64 --px 1024] [--out OUT.jsonl]"""
import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from mambakit.ops.triton.scan_gluon import gluon_scan  # noqa: E402
from mambakit.ops.triton.scan_launch import scan_inference  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=64)
p.add_argument("--px", type=int, default=1024)
p.add_argument("--out")
args = p.parse_args()
batch, dim, bf = args.batch, 384, torch.bfloat16
lp = -(-((args.px // 16) ** 2 + 1) // 16) * 16
u, z, y = (torch.randn(batch, dim, lp, device="cuda", dtype=bf) for _ in range(3))
delta = (torch.rand(batch, dim, lp, device="cuda") * 0.1).to(bf)
A = -torch.rand(dim, 16, device="cuda") - 0.5
bc = torch.randn(batch, 32, lp, device="cuda", dtype=bf)
B, C = bc[:, :16], bc[:, 16:]
D = torch.randn(dim, device="cuda")
rows = []
for reverse in (False, True):
    kw = dict(z=z, add=y, out_scale=0.5) if reverse else {}
    lanes = do_bench(lambda: scan_inference(u, delta, A, B, C, D, kw.get("z"), out=y, reverse=reverse,
                                            add=kw.get("add"), out_scale=kw.get("out_scale", 1.0),
                                            fixed_bc_stride=True), warmup=5, rep=40)
    for prefetch in (True, False):
        gl_ms = do_bench(lambda: gluon_scan(u, delta, A, B, C, D, out=y, reverse=reverse, prefetch=prefetch, **kw),
                         warmup=5, rep=40)
        rows.append(dict(reverse=reverse, prefetch=prefetch, default=prefetch == (not reverse),
                         lanes_ms=round(lanes, 4), gluon_ms=round(gl_ms, 4), batch=batch, px=args.px))
        print(json.dumps(rows[-1]), flush=True)
if args.out:
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
