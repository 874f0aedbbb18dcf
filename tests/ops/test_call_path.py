"""Following u from `mambakit.ops.selective_scan` down to the kernels (forward and backward,
the kernels run by Triton's interpreter on CPU) never climbs back up: no call enters a file
that is already on the call stack below another file. So a reader follows the path file by
file, each visited once on the way down (ops/__init__ -> scan_op -> scan_launch -> scan_plan,
launch -> scan_kernels -> helpers), as docs/architecture.md draws it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mambakit

pytest.importorskip("triton")
from mambakit.ops import selective_scan  # noqa: E402
from mambakit.ops.triton import scan_op, scan_plan  # noqa: E402, F401 (imported before the trace)
from tests.scan_inputs import make_scan_inputs  # noqa: E402

PACKAGE = str(Path(mambakit.__file__).parent)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _FileStack:
    """The package files on the call stack (frames outside the package are transparent), and
    every call that entered a file already on the stack below another one."""

    def __init__(self):
        self.stack: list[str] = []
        self.frames: list[bool] = []  # per frame on the real stack: whether it pushed a file
        self.back_edges: list[tuple[str, str]] = []
        self.visited: list[str] = []

    def __call__(self, frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            mine = path.startswith(PACKAGE) and frame.f_code.co_name != "<module>"  # calls, not imports
            if mine:
                name = path[len(PACKAGE) + 1:]
                if self.stack and name != self.stack[-1] and name in self.stack:
                    self.back_edges.append((self.stack[-1], f"{name}:{frame.f_code.co_name}"))
                if name not in self.visited:
                    self.visited.append(name)
                self.stack.append(name)
            self.frames.append(mine)
        elif event == "return" and self.frames:
            if self.frames.pop():
                self.stack.pop()


def test_the_scan_path_visits_each_file_once_on_the_way_down():
    kw = {k: v.to(DEVICE) for k, v in make_scan_inputs(1, 4, 20, 4, groups=2, with_init=True).items()}
    inputs = {k: v.requires_grad_() for k, v in kw.items()}
    scan_plan._PLANS.clear()  # the plan is worked out inside the traced call
    tracer = _FileStack()
    sys.setprofile(tracer)
    try:
        y, h = selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend="triton")
        (y.sum() + h.sum()).backward()
    finally:
        sys.setprofile(None)
    assert tracer.back_edges == []
    for name in ("ops/__init__.py", "ops/triton/scan_op.py", "ops/triton/scan_launch.py",
                 "ops/triton/scan_plan.py", "ops/triton/launch.py", "ops/triton/scan_kernels.py",
                 "ops/triton/helpers.py"):
        assert name in tracer.visited, (name, tracer.visited)
    order = tracer.visited  # first visits, in order: each layer of the path below the one before it
    assert order.index("ops/triton/scan_op.py") < order.index("ops/triton/scan_launch.py") \
        < order.index("ops/triton/scan_plan.py") < order.index("ops/triton/scan_kernels.py") \
        < order.index("ops/triton/helpers.py")
