"""Whether a call records anything for a backward: what picks between the ops' training paths
(Functions that save tensors) and their inference paths (launchers called directly, outputs
written over inputs)."""

from __future__ import annotations

import torch


def records_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def no_autograd(*tensors) -> bool:
    """Whether a call on these tensors records nothing for a backward (no_grad, inference mode,
    or none of them requires grad), outside torch.compile's tracing: then an op may write its
    output over an input (out=)."""
    return not torch.compiler.is_compiling() and not records_grad(*tensors)
