"""Count the SASS instructions of the Gluon scan's chunk loop (ops/triton/scan_gluon.py),
compiled offline for sm_90 at Vim-Ti's padded shape, no GPU needed:

    PYTHONPATH=<triton 3.6> python benchmarks/tuning/gluon_scan_sass.py [--reverse] [--prefetch 0|1] [--dump]

Compare with `benchmarks/tuning/scan_sass.py` (the Triton lanes scan: 573 forward, 617 reversed)."""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from mambakit.ops.triton.scan_gluon import _gluon_scan_kernel  # noqa: E402
from sass_loop import chunk_loop  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--reverse", action="store_true")
p.add_argument("--prefetch", type=int, choices=[0, 1], help="default: as gluon_scan (on forward, off reversed)")
p.add_argument("--length", type=int, default=4112)
p.add_argument("--dump", action="store_true")
args = p.parse_args()
params = list(inspect.signature(_gluon_scan_kernel.fn).parameters)
consts = dict(BLOCK_D=16, T=8, N=16, BN_STRIDE=args.length, REVERSE=args.reverse, HAS_Z=args.reverse,
              HAS_ADD=args.reverse, OUT_SCALE=0.5 if args.reverse else 1.0,
              PREFETCH=(not args.reverse) if args.prefetch is None else bool(args.prefetch))
pointers = dict(u_ptr="bf16", dt_ptr="bf16", A_ptr="fp32", B_ptr="bf16", C_ptr="bf16", D_ptr="fp32", z_ptr="bf16",
                add_ptr="bf16", out_ptr="bf16")
sig = {k: "constexpr" if k in consts else ("*" + pointers[k] if k in pointers else "i32") for k in params}
attrs = {(params.index(k),): [["tt.divisibility", 16]] for k in params if k not in consts}
src = GluonASTSource(_gluon_scan_kernel, sig, {(params.index(k),): v for k, v in consts.items()}, attrs)
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
chunk_loop(compiled.asm["cubin"]).report(f"gluon scan {'reversed' if args.reverse else 'forward'}", 8,
                                          f"{compiled.metadata.shared} bytes of shared memory", args.dump)
