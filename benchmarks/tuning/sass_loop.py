"""Kernels compiled offline for sm_90 (no GPU): a captured launch compiled as the launcher would
(`compile_launch`), and the SASS of its chunk loop, the instruction counts and resource use,
disassembled with the nvdisasm and cuobjdump that ship with Triton. Shared by scan_sass.py,
gluon_scan_sass.py and ssd_ptx.py."""
from __future__ import annotations

import collections
import inspect
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}


def compile_launch(kernel, values: list, kwargs: dict):
    """`kernel` compiled for sm_90 with the arguments of a captured launch (positional values,
    keyword constexprs and num_warps / num_stages / maxnreg), specialized as the launcher
    specializes them: ints of 1 as constants, pointers and ints divisible by 16 marked so."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    parameters = inspect.signature(kernel.fn).parameters
    bound = dict(zip(parameters, values)) | kwargs
    signature, constants, attrs = {}, {}, {}
    for i, (name, parameter) in enumerate(parameters.items()):
        v = bound.get(name, None if parameter.default is inspect.Parameter.empty else parameter.default)
        if kernel.params[i].is_constexpr or v is None or (type(v) is int and v == 1):
            signature[name], constants[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


@dataclass
class ChunkLoop:
    ops: collections.Counter  # opcode -> count, over the loop's instructions
    lines: list  # the loop's SASS lines
    registers: int
    stack: int

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def report(self, label: str, steps: int, resources: str, dump: bool = False) -> None:
        """Print the loop's size a chunk of `steps` steps and a step, its opcodes, and its SASS if `dump`."""
        print(f"triton {triton.__version__}, {label}: {self.total} instructions in the chunk loop, "
              f"{self.total / steps:.1f} a step, {self.ops['MUFU'] / steps:.1f} MUFU a step; {self.registers} "
              f"registers, {resources}")
        print(", ".join(f"{k} {v}" for k, v in self.ops.most_common()))
        if dump:
            print("\n".join(self.lines))


def chunk_loop(cubin: bytes) -> ChunkLoop:
    """The longest block between a label and a conditional branch back to it (the chunk loop)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
        usage = subprocess.run([str(nvdisasm.parent / "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    loops = []
    for back, line in enumerate(sass):
        if m := re.search(r"@!?P\d BRA `\((\.L_x_\d+)\)", line):
            start = next((i for i, ln in enumerate(sass[:back]) if ln.startswith(m.group(1) + ":")), None)
            if start is not None:
                loops.append((back - start, start, back))
    _, start, back = max(loops)
    lines = sass[start:back + 1]
    ops = collections.Counter(m.group(1) for line in lines
                              if (m := re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)))
    return ChunkLoop(ops, lines, int(re.search(r"REG:(\d+)", usage).group(1)),
                     int(re.search(r"STACK:(\d+)", usage).group(1)))
