"""mamba_ssm's selective_state_update: one decoding step, in place on the state, in both of the
official forms, told apart by the state's rank:

  Mamba-1   state (batch, dim, N); x, dt, z (batch, dim); A (dim, N); B, C (batch, N) or
            (batch, G, N); D, dt_bias (dim,)                                   -> ops.selective_state_update
  headed    state (batch, H, P, N); x, dt, z (batch, H, P); A (H, P, N); B, C (batch, G, N);
            D, dt_bias (H, P)

Mamba-2 callers pass the headed form's A, dt and dt_bias as per-head values broadcast over P (and
N) with stride 0; like the official kernel ("tie_hdim") that case runs as Mamba-2's step,
`ops.ssd_state_update_`, and any other headed input runs the general per-(head, channel) step
below. Either way the arithmetic is fp32 (fp64 for a fp64 state) and y comes from the new state
before it is rounded to the state's dtype, as in the official kernel: a bf16 state stores the
rounded state but the output does not see that rounding.

state_batch_indices (batch,): row b updates state[state_batch_indices[b]] (continuous batching);
a negative index marks padding, whose output is 0 and which touches no state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops

_EXACT = (torch.float32, torch.float64)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update: updates `state` in place
    and returns out, shaped as x, in x's dtype."""
    if not isinstance(state, Tensor) or state.ndim not in (3, 4):
        got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
        raise ValueError(f"selective_state_update: state must be (batch, dim, N) or (batch, nheads, dim, N), got {got}")
    step = _mamba1_step if state.ndim == 3 else _headed_step
    if state.ndim == 4:
        _check_headed(state, x, dt, A, B, C, D, z, dt_bias, batch=None if state_batch_indices is None else x.shape[0])
    if state_batch_indices is None:
        return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _indexed_step(step, state, state_batch_indices, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _mamba1_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    if state.dtype in _EXACT:
        return ops.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    exact = state.float()  # y from the fp32 state, then the state rounded once
    y = ops.selective_state_update(exact, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    state.copy_(exact)
    return y


def _headed_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    if _tied_over_channels(A, dt, dt_bias) and state.is_contiguous():
        return ops.ssd_state_update_(state, x, dt[..., 0], A[:, 0, 0], B, C, D=D, z=z,
                                     dt_bias=None if dt_bias is None else dt_bias[:, 0], dt_softplus=dt_softplus)
    return _headed_step_general(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _tied_over_channels(A, dt, dt_bias) -> bool:
    """The official kernel's tie_hdim: A, dt and dt_bias are one value per head (stride 0 over P, N)."""
    return (A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0
            and (dt_bias is None or dt_bias.stride(-1) == 0))


def _headed_step_general(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The headed step with a step size per (head, channel) and A per (head, channel, state)."""
    cdt = torch.float64 if state.dtype == torch.float64 else torch.float32
    per_group = state.shape[1] // B.shape[1]
    step = dt.to(cdt)  # (batch, H, P)
    if dt_bias is not None:
        step = step + dt_bias.to(cdt)
    if dt_softplus:
        step = F.softplus(step)
    xc = x.to(cdt)  # (batch, H, P)
    Bh = B.to(cdt).repeat_interleave(per_group, dim=1)[:, :, None, :]  # (batch, H, 1, N)
    Ch = C.to(cdt).repeat_interleave(per_group, dim=1)[:, :, None, :]  # (batch, H, 1, N)
    new = state.to(cdt) * torch.exp(step[..., None] * A.to(cdt)) + (step * xc)[..., None] * Bh  # (batch, H, P, N)
    y = (new * Ch).sum(-1)  # (batch, H, P)
    state.copy_(new)
    if D is not None:
        y = y + D.to(cdt) * xc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype)


def _indexed_step(step, state, indices, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The step on state[indices[b]] for each row b; rows with a negative index give 0."""
    batch = x.shape[0] if isinstance(x, Tensor) else None
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError("selective_state_update: state_batch_indices must be an int32 tensor of shape (batch,)")
    if tuple(indices.shape) != (batch,):
        raise ValueError(f"selective_state_update: state_batch_indices must have shape (batch,) = ({batch},), "
                         f"got {tuple(indices.shape)}")
    if bool((indices >= state.shape[0]).any()):
        raise ValueError(f"selective_state_update: state_batch_indices must be < the state's batch "
                         f"{state.shape[0]}, got {indices.tolist()}")
    valid = (indices >= 0).nonzero().flatten()  # the rows that are not padding
    rows = indices[valid].long()
    states = state[rows]  # a copy, updated by the step
    pick = (lambda t: None if t is None else t[valid])
    y = step(states, x[valid], dt[valid], A, B[valid], C[valid], D, pick(z), dt_bias, dt_softplus)
    state[rows] = states
    out = x.new_zeros(x.shape)
    out[valid] = y
    return out


def _check_headed(state, x, dt, A, B, C, D, z, dt_bias, batch):
    """The headed form's shapes, as the official asserts them. batch: x's rows when they index the
    state through state_batch_indices (else the state's)."""
    rows, heads, dim, d_state = state.shape
    rows = rows if batch is None else batch
    expect = {"x": (x, (rows, heads, dim)), "dt": (dt, (rows, heads, dim)), "A": (A, (heads, dim, d_state)),
              "z": (z, (rows, heads, dim)), "D": (D, (heads, dim)), "dt_bias": (dt_bias, (heads, dim))}
    for name, (t, shape) in expect.items():
        if t is None and name in ("z", "D", "dt_bias"):
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"selective_state_update: with state (batch, nheads, dim, N) = {tuple(state.shape)}, "
                             f"{name} must have shape {shape}, got {got}")
    for name, t in (("B", B), ("C", C)):
        if not isinstance(t, Tensor) or t.ndim != 3 or t.shape[0] != rows or t.shape[2] != d_state \
                or t.shape[1] < 1 or heads % t.shape[1] or tuple(t.shape) != tuple(B.shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"selective_state_update: {name} must be (batch, ngroups, N) = ({rows}, G, {d_state}) "
                             f"with G dividing nheads={heads} (B and C alike), got {got}")
