"""Argument checking shared by every scan and conv backend.

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape or value) with a
message that names the argument and the shapes involved, so that bad input never turns into
an IndexError deep inside a kernel or a silent broadcast."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MAX_D_STATE
from .recording import records_grad

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def require_tensor(name: str, t, *, ndim: int | tuple[int, ...] | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        kind = "complex" if t.is_complex() else str(t.dtype)
        raise TypeError(f"{name} must be a real floating tensor (fp16/bf16/fp32/fp64), got {kind} ({t.dtype})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.ndim not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {_shape(t)}")


def require_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {_shape(t)}")


def require_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:  # non-tensors: their own check names them
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put all inputs on one device")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, otherwise fp32 (fp16/bf16 inputs accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class ScanShape:
    batch: int
    dim: int
    length: int
    d_state: int
    groups: int  # 1 for (B, N, L) inputs
    grouped: bool  # B/C were given as (B, G, N, L)
    n_seqs: int  # number of sequences: batch, or S with cu_seqlens


def check_cu_seqlens(cu_seqlens, length: int, batch: int) -> int:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 2 offsets, got shape {_shape(cu_seqlens)}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed along L with batch 1, got batch {batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at L={length}, got {offsets[0]}..{offsets[-1]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {offsets}")
    return len(offsets) - 1


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                    cu_seqlens=None) -> ScanShape:
    require_tensor("u", u, ndim=3)
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError(f"u has sequence length L=0 (shape {_shape(u)}); the scan needs L >= 1")
    require_tensor("delta", delta, ndim=3)
    require_shape("delta", delta, u.shape, "same as u: (B, D, L)")
    require_tensor("A", A, ndim=2)
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (D={dim}, N), got {_shape(A)}")
    d_state = A.shape[1]
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"A has N={d_state} states; N must be in 1..{MAX_D_STATE} (A shape {_shape(A)})")
    require_tensor("B", B, ndim=(3, 4))
    require_tensor("C", C, ndim=(3, 4))
    if B.ndim != C.ndim:
        raise ValueError(f"B and C must both be (B, N, L) or both (B, G, N, L), got {_shape(B)} and {_shape(C)}")
    grouped = B.ndim == 4
    groups = B.shape[1] if grouped else 1
    if grouped and (groups < 1 or dim % groups != 0):
        raise ValueError(f"B has G={groups} groups, which must divide D={dim} (B shape {_shape(B)})")
    expect = (batch, groups, d_state, length) if grouped else (batch, d_state, length)
    what = "(B, G, N, L)" if grouped else "(B, N, L)"
    require_shape("B", B, expect, f"{what} with B, L from u and N from A")
    require_shape("C", C, expect, f"{what} with B, L from u and N from A")
    _check_skip_and_gate(D, delta_bias, z, dim, "u", u)
    require_same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                        initial_state=initial_state, cu_seqlens=cu_seqlens)
    n_seqs = batch
    if cu_seqlens is not None:
        n_seqs = check_cu_seqlens(cu_seqlens, length, batch)
    if initial_state is not None:
        require_tensor("initial_state", initial_state, ndim=3)
        what = "(S, D, N) with S sequences from cu_seqlens" if cu_seqlens is not None else "(B, D, N)"
        require_shape("initial_state", initial_state, (n_seqs, dim, d_state), what)
    return ScanShape(batch, dim, length, d_state, groups, grouped, n_seqs)


def check_dt_proj_args(u, dt, dt_weight) -> None:
    """The low-rank step input dt (B, R, L) and the projection dt_weight (D, R) of
    selective_scan_dt_proj, against u (B, D, L)."""
    require_tensor("u", u, ndim=3)
    batch, dim, length = u.shape
    require_tensor("dt", dt, ndim=3)
    require_tensor("dt_weight", dt_weight, ndim=2)
    if dt.shape[0] != batch or dt.shape[2] != length:
        raise ValueError(f"dt must have shape (B={batch}, R, L={length}) from u, got {_shape(dt)}")
    require_shape("dt_weight", dt_weight, (dim, dt.shape[1]), "(D, R) with D from u and R from dt")
    require_same_device("u", u, dt=dt, dt_weight=dt_weight)


def check_conv_args(x, weight, bias=None, activation=None, initial_state=None, cu_seqlens=None) -> int:
    """Returns the kernel width K."""
    require_tensor("x", x, ndim=3)
    batch, dim, length = x.shape
    if length == 0:
        raise ValueError(f"x has sequence length L=0 (shape {_shape(x)}); the conv needs L >= 1")
    require_tensor("weight", weight, ndim=2)
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (D={dim}, K) with K >= 1, got {_shape(weight)}")
    width = weight.shape[1]
    if bias is not None:
        require_tensor("bias", bias, ndim=1)
        require_shape("bias", bias, (dim,), "(D,)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    require_same_device("x", x, weight=weight, bias=bias, initial_state=initial_state, cu_seqlens=cu_seqlens)
    n_seqs = batch if cu_seqlens is None else check_cu_seqlens(cu_seqlens, length, batch)
    if initial_state is not None:
        require_tensor("initial_state", initial_state, ndim=3)
        what = "(S, D, K-1) with S sequences from cu_seqlens" if cu_seqlens is not None else "(B, D, K-1)"
        require_shape("initial_state", initial_state, (n_seqs, dim, width - 1), what)
    return width


def check_state_update_args(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> None:
    require_tensor("state", state, ndim=3)
    batch, dim, d_state = state.shape
    require_tensor("x", x, ndim=2)
    require_shape("x", x, (batch, dim), "(B, D) from state (B, D, N)")
    require_tensor("dt", dt, ndim=2)
    require_shape("dt", dt, (batch, dim), "(B, D)")
    require_tensor("A", A, ndim=2)
    require_shape("A", A, (dim, d_state), "(D, N) from state (B, D, N)")
    require_tensor("B", B, ndim=(2, 3))
    require_tensor("C", C, ndim=(2, 3))
    if B.ndim != C.ndim:
        raise ValueError(f"B and C must both be (B, N) or both (B, G, N), got {_shape(B)} and {_shape(C)}")
    if B.ndim == 3:
        groups = B.shape[1]
        if groups < 1 or dim % groups:
            raise ValueError(f"B has G={groups} groups, which must divide D={dim}")
        expect = (batch, groups, d_state)
    else:
        expect = (batch, d_state)
    require_shape("B", B, expect, "(B, [G,] N)")
    require_shape("C", C, expect, "(B, [G,] N)")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            require_tensor(name, t, ndim=1)
            require_shape(name, t, (dim,), "(D,)")
    if z is not None:
        require_tensor("z", z, ndim=2)
        require_shape("z", z, (batch, dim), "(B, D)")
    require_same_device("state", state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def check_conv_update_args(x, conv_state, weight, bias=None, activation=None) -> None:
    require_tensor("conv_state", conv_state, ndim=3)
    batch, dim, width_m1 = conv_state.shape
    require_tensor("x", x, ndim=2)
    require_shape("x", x, (batch, dim), "(B, D) from conv_state (B, D, K-1)")
    require_tensor("weight", weight, ndim=2)
    require_shape("weight", weight, (dim, width_m1 + 1), "(D, K) from conv_state (B, D, K-1)")
    if bias is not None:
        require_tensor("bias", bias, ndim=1)
        require_shape("bias", bias, (dim,), "(D,)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    require_same_device("conv_state", conv_state, x=x, weight=weight, bias=bias)


def check_conv_proj_scan_args(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias,
                              cu_seqlens) -> None:
    """conv_proj_scan's arguments: x (B, D, L), the conv's weight (D, K) and bias (D,), x_proj's
    weight (R + 2N, D), dt_proj's weight (D, R), A (D, N), D and delta_bias (D,), z (B, D, L)."""
    check_conv_args(x, conv_weight, conv_bias, "silu", None, cu_seqlens)
    dim = x.shape[1]
    require_tensor("A", A, ndim=2)
    require_shape("A", A, (dim, A.shape[1]), "(D, N) with D from x")
    d_state = A.shape[1]
    require_tensor("x_proj_weight", x_proj_weight, ndim=2)
    if x_proj_weight.shape[1] != dim or x_proj_weight.shape[0] <= 2 * d_state:
        raise ValueError(f"x_proj_weight must have shape (R + 2N, D={dim}) with R >= 1 and N={d_state} from A, "
                         f"got {_shape(x_proj_weight)}")
    rank = x_proj_weight.shape[0] - 2 * d_state
    require_tensor("dt_proj_weight", dt_proj_weight, ndim=2)
    require_shape("dt_proj_weight", dt_proj_weight, (dim, rank), "(D, R) with D from x and R from x_proj_weight")
    _check_skip_and_gate(D, delta_bias, z, dim, "x", x)
    require_same_device("x", x, x_proj_weight=x_proj_weight, dt_proj_weight=dt_proj_weight, A=A, D=D, z=z,
                        delta_bias=delta_bias)


def _check_skip_and_gate(D, delta_bias, z, dim: int, ref_name: str, ref: torch.Tensor) -> None:
    """The scan's optional per-channel D and delta_bias (D,), and its gate z, shaped as `ref` (B, D, L)."""
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            require_tensor(name, t, ndim=1)
            require_shape(name, t, (dim,), "(D,)")
    if z is not None:
        require_tensor("z", z, ndim=3)
        require_shape("z", z, ref.shape, f"same as {ref_name}: (B, D, L)")


def check_scan_out(out, u, *inputs) -> None:
    """selective_scan's `out=`: a tensor of u's shape, dtype and device, and no gradient asked
    for (autograd cannot record a scan written over its own input)."""
    require_tensor("out", out, ndim=3)
    if out.shape != u.shape or out.dtype != u.dtype or out.device != u.device:
        raise ValueError(f"out must have u's shape, dtype and device {_shape(u)}, {u.dtype}, {u.device}; "
                         f"got {_shape(out)}, {out.dtype}, {out.device}")
    if records_grad(u, out, *inputs):
        raise ValueError("selective_scan(out=...) is for inference: run it under torch.no_grad(), or without "
                         "inputs that require grad")
