"""mamba_ssm's selective_scan_fn (Mamba-1's scan) over `mambakit.ops.selective_scan`."""

from __future__ import annotations

import torch

from .. import ops


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn: returns out, or (out, last_state)."""
    for name, t in (("B", B), ("C", C)):
        if isinstance(t, torch.Tensor) and t.ndim == 2:
            raise ValueError(f"selective_scan_fn: {name} of shape (D, N) (non-selective {name}) is not supported; "
                             f"pass {name} as (batch, N, L) or (batch, G, N, L)")
    return ops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              return_final_state=return_last_state)
