"""Which implementation of an op runs: the backend dispatch shared by every public op.

`backend=None` (or "auto") picks the fused Triton kernels for CUDA tensors (fp16/bf16/fp32)
when triton is installed, and the torch path elsewhere. "triton", "torch" and "reference"
(the sequential spec in reference.py) force one. Triton runs on CPU tensors only under the
interpreter (`TRITON_INTERPRET=1`, which the tests set)."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "torch", "reference")


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports (it is optional: `pip install 'mambakit[gpu]'`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_kernels_for(t: torch.Tensor) -> bool:
    """Whether the default backend for `t` is Triton: a CUDA tensor that is not fp64, with triton
    installed (the unchecked decoding steps and the fused norm pick their path this way)."""
    return t.is_cuda and t.dtype != torch.float64 and triton_available()


def resolve(backend: str | None, x: torch.Tensor | None = None) -> str:
    """The backend that runs for the input x: None/"auto" picks Triton for CUDA tensors
    (fp16/bf16/fp32) when triton is installed, else torch. A forced backend is checked
    against the input, with a ValueError that says what is missing."""
    if backend is None or backend == "auto":
        return "triton" if x is not None and fused_kernels_for(x) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None), got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install 'mambakit[gpu]')")
        if x is not None and not x.is_cuda and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                             f"to run the kernels on CPU")
        if x is not None and x.dtype == torch.float64:
            raise ValueError("backend='triton' computes in fp32; use backend='torch' for float64 inputs")
    return backend
