"""The SSD kernels compiled offline for sm_90 (no GPU): each kernel's global loads by width.

    python benchmarks/tuning/ssd_ptx.py                          # 1 x 32768, N 64, 32 heads x 64, bf16
    python benchmarks/tuning/ssd_ptx.py --length 8192 --d-state 128 --kernels chunk_output_kernel dx_kernel

The launches are captured from the autograd function of ops/triton/ssd_op.py exactly as a
forward and backward make them (strides, dtypes, tiles from ssd_tiles.py), then compiled with
Triton's own ptxas for sm_90. Printed per kernel: its grid, the PTX length, and its global loads
by width: `cp.async/0x10` and `ld.global.v4.b32` move 16 bytes per thread, `cp.async/0x4` and
`ld.global.b32` 4. A tile loaded under a mask that varies along its contiguous axis (a triangle)
cannot use the 16-byte forms; between GPU runs the counts show whether a change kept the loads
wide."""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton  # noqa: E402

import mambakit.ops.triton.ssd_op as ssd_op  # noqa: E402
from sass_loop import compile_launch  # noqa: E402
ASYNC_COPY = re.compile(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-f]+|\d+)")


def captured_launches(batch: int, length: int, heads: int, headdim: int, d_state: int, chunk: int):
    """Every kernel launch of one forward and backward, as (kernel, grid, args, kwargs), not run."""
    launches = []
    ssd_op._run = lambda kernel, grid, *args, **kwargs: launches.append((kernel, grid, args, kwargs))
    bf16, n_chunks = torch.bfloat16, triton.cdiv(length, chunk)
    x = torch.empty(batch, length, heads, headdim, dtype=bf16)
    B, C = (torch.empty(batch, length, 1, d_state, dtype=bf16) for _ in range(2))
    step, cs = (torch.empty(batch, heads, n_chunks, chunk) for _ in range(2))

    class Context:  # what autograd hands the function
        needs_input_grad = [True] * 8
        has_init, init_dtype, b_dtype, c_dtype = False, None, bf16, bf16

        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    ctx = Context()
    y, _ = ssd_op._SSD.forward(ctx, x, step, cs, B, C, torch.empty(heads), None, bf16)
    ssd_op._SSD.backward(ctx, torch.empty_like(y), None)
    return launches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--kernels", nargs="+", default=None, help="only these (e.g. chunk_output_kernel dx_kernel)")
    args = p.parse_args()
    for kernel, grid, values, kwargs in captured_launches(args.batch, args.length, args.heads, args.headdim,
                                                          args.d_state, args.chunk):
        name = kernel.fn.__name__
        if args.kernels and name not in args.kernels:
            continue
        ptx = compile_launch(kernel, values, kwargs).asm["ptx"]
        loads = collections.Counter(re.findall(r"\b(ld\.global[\w.:]*)", ptx))
        loads.update("cp.async/" + size for size in ASYNC_COPY.findall(ptx))
        print(f"{name:28s} grid {str(grid):14s} {ptx.count(chr(10)):5d} PTX lines  {dict(sorted(loads.items()))}")


if __name__ == "__main__":
    main()
