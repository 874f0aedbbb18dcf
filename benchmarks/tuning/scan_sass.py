"""Count the SASS instructions of the lanes scan's forward loop, compiled offline for sm_90 (no GPU).

    python benchmarks/tuning/scan_sass.py                      # Vim-Ti's padded-path shape (64 x 384 x 4112)
    python benchmarks/tuning/scan_sass.py --reverse
    PYTHONPATH=<triton 3.6> python benchmarks/tuning/scan_sass.py   # the device's Triton

The scan at Vim's shape is close to bound by instructions issued (Nsight Compute in
BENCHMARKS.md), so the loop's instruction count per 8-step chunk is a usable proxy between
device runs. The launch is captured from `scan_inference` exactly as the padded path makes it
(strides, dtypes, the launcher's shape), then compiled with Triton's own ptxas and disassembled
with its nvdisasm; the loop is the block between the label that the back branch targets and
that branch."""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
import triton  # noqa: E402

import mambakit.ops.triton.scan_launch as ss  # noqa: E402
from sass_loop import chunk_loop, compile_launch  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--reverse", action="store_true")
p.add_argument("--batch", type=int, default=64)
p.add_argument("--dim", type=int, default=384)
p.add_argument("--length", type=int, default=4112)
p.add_argument("--bc-dtype", choices=("bf16", "fp32"), default="bf16", help="B and C as x_proj writes them")
p.add_argument("--lanes", type=json.loads, default=None, help='a shape override, e.g. \'{"NL": 1, "BLOCK_D": 32}\'')
p.add_argument("--ptx", action="store_true", help="print the special-function PTX instructions used")
p.add_argument("--dump", action="store_true", help="print the loop's SASS")
args = p.parse_args()

# the padded path's calls (mambakit/ops/vision.py): batch-major (B, C, Lp) rows, Δ after its
# softplus and B and C as x_proj_delta writes them ((B, 2N, Lp), their state stride compiled in);
# the forward ungated over its input, the reversed one gated, adding the forward's output
captured = {}
ss.launch = lambda kernel, grid, a, kw: captured.update(kernel=kernel, args=a, kwargs=dict(kw))
batch, di, n, lp, bf16 = args.batch, args.dim, 16, args.length, torch.bfloat16
u, delta, z, y_f = (torch.empty(batch, di, lp, dtype=bf16) for _ in range(4))
bc = torch.empty(batch, 2 * n, lp, dtype=bf16 if args.bc_dtype == "bf16" else torch.float32)
B_, C_ = bc[:, :n], bc[:, n:]
if args.reverse:
    ss.scan_inference(u, delta, torch.empty(di, n), B_, C_, torch.empty(di), z, out=y_f, reverse=True, add=y_f,
                      out_scale=0.5, fixed_bc_stride=True, lanes=args.lanes)
else:
    ss.scan_inference(u, delta, torch.empty(di, n), B_, C_, torch.empty(di), out=u, fixed_bc_stride=True,
                      lanes=args.lanes)

kernel, values, kwargs = captured["kernel"], captured["args"], captured["kwargs"]
kwargs["FAST"] = True
compiled = compile_launch(kernel, values, kwargs)
if args.ptx:
    print(collections.Counter(re.findall(r"\b(ex2\.[a-z0-9.]+|lg2\.[a-z0-9.]+|rcp\.[a-z0-9.]+|tanh\.[a-z0-9.]+)",
                                         compiled.asm["ptx"])))
loop = chunk_loop(compiled.asm["cubin"])
shape = {k: v for k, v in captured["kwargs"].items() if k in ("NL", "BLOCK_D", "T", "PREFETCH", "EVEN", "REVERSE")}
loop.report(str(shape), shape["T"], f"{loop.stack} bytes of stack", args.dump)
