"""Argument checking for the Mamba-2 state-space dual (SSD) scan, shared by its backends.

Like checks.py: TypeError for a wrong type or dtype, ValueError for a wrong shape or value,
each message naming the argument and the shapes involved."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..config import MAX_D_STATE
from .checks import _shape, check_cu_seqlens, require_same_device, require_shape, require_tensor


@dataclass(frozen=True)
class SSDShape:
    batch: int
    length: int
    heads: int  # H
    headdim: int  # P
    groups: int  # G: B/C groups, each shared by H // G heads
    d_state: int  # N
    n_seqs: int  # batch, or S with cu_seqlens


def check_dt_limit(dt_limit) -> tuple[float, float]:
    """dt_limit: a pair (lo, hi) of real numbers with 0 <= lo <= hi (hi may be inf)."""
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit must be a pair (lo, hi), got {dt_limit!r}")
    lo, hi = dt_limit
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
            raise TypeError(f"dt_limit must hold two real numbers, got {dt_limit!r}")
    if lo < 0 or lo > hi:
        raise ValueError(f"dt_limit (lo, hi) needs 0 <= lo <= hi, got {dt_limit!r}")
    return float(lo), float(hi)


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    return int(chunk_size)


def check_ssd_args(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_limit=(0.0, math.inf), initial_state=None,
                   cu_seqlens=None) -> SSDShape:
    """x, z: (batch, L, H, P); dt: (batch, L, H); A, dt_bias: (H,); B, C: (batch, L, G, N);
    D: (H,) or (H, P); initial_state: (batch, H, P, N), or (S, H, P, N) with cu_seqlens."""
    require_tensor("x", x, ndim=4)
    batch, length, heads, headdim = x.shape
    if length == 0:
        raise ValueError(f"x has sequence length L=0 (shape {_shape(x)}); the scan needs L >= 1")
    require_tensor("dt", dt, ndim=3)
    require_shape("dt", dt, (batch, length, heads), "(batch, L, H) from x")
    require_tensor("A", A, ndim=1)
    require_shape("A", A, (heads,), "(H,) from x (batch, L, H, P)")
    require_tensor("B", B, ndim=4)
    require_tensor("C", C, ndim=4)
    groups, d_state = B.shape[2], B.shape[3]
    if groups < 1 or heads % groups:
        raise ValueError(f"B has G={groups} groups, which must divide H={heads} (B shape {_shape(B)})")
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"B has N={d_state} states; N must be in 1..{MAX_D_STATE} (B shape {_shape(B)})")
    require_shape("B", B, (batch, length, groups, d_state), "(batch, L, G, N) with batch, L from x")
    require_shape("C", C, (batch, length, groups, d_state), "(batch, L, G, N), as B")
    if D is not None:
        require_tensor("D", D, ndim=(1, 2))
        require_shape("D", D, (heads,) if D.ndim == 1 else (heads, headdim), "(H,) or (H, P) from x")
    if dt_bias is not None:
        require_tensor("dt_bias", dt_bias, ndim=1)
        require_shape("dt_bias", dt_bias, (heads,), "(H,) from x")
    if z is not None:
        require_tensor("z", z, ndim=4)
        require_shape("z", z, x.shape, "same as x: (batch, L, H, P)")
    check_dt_limit(dt_limit)
    require_same_device("x", x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state,
                        cu_seqlens=cu_seqlens)
    n_seqs = batch if cu_seqlens is None else check_cu_seqlens(cu_seqlens, length, batch)
    if initial_state is not None:
        require_tensor("initial_state", initial_state, ndim=4)
        what = "(S, H, P, N) with S sequences from cu_seqlens" if cu_seqlens is not None else "(batch, H, P, N)"
        require_shape("initial_state", initial_state, (n_seqs, heads, headdim, d_state), what)
    return SSDShape(batch, length, heads, headdim, groups, d_state, n_seqs)


def check_ssd_state_update_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_limit=(0.0, math.inf)):
    """The headed step's arguments: state (batch, H, P, N), x/z (batch, H, P), dt (batch, H),
    A/dt_bias (H,), B/C (batch, G, N) with G dividing H, D (H,) or (H, P)."""
    require_tensor("state", state, ndim=4)
    batch, heads, headdim, d_state = state.shape
    require_tensor("x", x, ndim=3)
    require_shape("x", x, (batch, heads, headdim), f"state {_shape(state)} (batch, H, P, N)")
    require_tensor("dt", dt, ndim=2)
    require_shape("dt", dt, (batch, heads), "(batch, H)")
    require_tensor("A", A, ndim=1)
    require_shape("A", A, (heads,), "(H,)")
    require_tensor("B", B, ndim=3)
    groups = B.shape[1]
    if groups < 1 or heads % groups:
        raise ValueError(f"B's groups ({groups}) must divide the heads H={heads}")
    require_shape("B", B, (batch, groups, d_state), "(batch, G, N)")
    require_tensor("C", C, ndim=3)
    require_shape("C", C, (batch, groups, d_state), "(batch, G, N) like B")
    if d_state > MAX_D_STATE:
        raise ValueError(f"d_state N={d_state} is above {MAX_D_STATE}")
    if D is not None:
        require_tensor("D", D, ndim=(1, 2))
        if tuple(D.shape) not in ((heads,), (heads, headdim)):
            raise ValueError(f"D must be (H,) = ({heads},) or (H, P) = ({heads}, {headdim}), got {_shape(D)}")
    if z is not None:
        require_tensor("z", z, ndim=3)
        require_shape("z", z, tuple(x.shape), "x's shape")
    if dt_bias is not None:
        require_tensor("dt_bias", dt_bias, ndim=1)
        require_shape("dt_bias", dt_bias, (heads,), "(H,)")
    check_dt_limit(dt_limit)
    require_same_device("state", state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
