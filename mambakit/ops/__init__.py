"""mambakit's operators: the public functions that every higher layer calls, and their backend
dispatch. Nothing above `mambakit.ops` imports its submodules (import-linter checks it).

`backend=None` picks the fastest implementation available for the inputs' device: the fused
Triton kernels for CUDA tensors (fp16/bf16/fp32, when triton is installed), the torch paths
elsewhere (the chunked scan of scan.py, conv.py, step.py). `backend="triton"`, `"torch"` or
`"reference"` (the sequential spec, reference.py) forces one (backend.py). Each op has its
readable reference in reference.py, and its tests compare the two. The Triton kernels'
tuning knobs are in knobs.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backend as _backend
from . import knobs
from .backend import BACKENDS, triton_available
from .checks import (check_conv_args, check_conv_proj_scan_args, check_conv_update_args, check_cu_seqlens,
                     check_dt_proj_args, check_scan_args, check_scan_out, check_state_update_args)
from .conv import causal_conv1d_torch
from .recording import no_autograd, records_grad
from .reference import (add_rms_norm_ref, batched_linear, bimamba_inference_ref, causal_conv1d_ref,
                        causal_conv1d_update_ref, gated_rms_norm_ref, patchify_ref, selective_scan_ref, selective_state_update_ref,
                        ssd_dual_ref, ssd_ref, ssd_state_update_ref)
from .scan import selective_scan_chunked
from .ssd import DEFAULT_CHUNK_SIZE as SSD_CHUNK_SIZE
from .ssd import ssd_chunked
from .ssd_checks import check_chunk_size, check_ssd_args, check_ssd_state_update_args
from .step import causal_conv1d_update_ as _conv_update_torch_
from .step import selective_state_update_ as _state_update_torch_
from .step import ssd_state_update_ as _ssd_state_update_torch_
from .vision import BiMambaWeights, bimamba_inference

__all__ = [
    "BACKENDS", "BiMambaWeights", "add_rms_norm", "add_rms_norm_ref", "batched_linear", "bimamba_inference",
    "bimamba_inference_ref", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_torch", "causal_conv1d_update",
    "causal_conv1d_update_", "causal_conv1d_update_ref", "check_cu_seqlens", "conv_proj_scan", "dt_proj_state_update_",
    "gated_rms_norm", "gated_rms_norm_ref", "knobs",
    "no_autograd", "patchify", "patchify_ref", "records_grad", "resolve_backend", "selective_scan",
    "selective_scan_chunked", "selective_scan_dt_proj", "selective_scan_ref", "selective_state_update",
    "selective_state_update_", "selective_state_update_ref", "ssd", "ssd_chunked", "ssd_dual_ref", "ssd_ref", "ssd_state_update_",
    "ssd_state_update_ref",
    "triton_available",
]


def resolve_backend(backend: str | None, x: Tensor | None = None) -> str:
    """The backend that runs an op for the input x ("triton", "torch" or "reference"); see backend.py."""
    return _backend.resolve(backend, x)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   initial_state: Tensor | None = None, return_final_state: bool = False,
                   cu_seqlens: Tensor | None = None, *, backend: str | None = None, out: Tensor | None = None
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L) or (B, G, N, L); D, delta_bias: (D,);
    initial_state: (B, D, N), or (S, D, N) with cu_seqlens (int32 (S+1,) offsets, batch 1).
    Returns y (B, D, L) [, final_state (B or S, D, N), fp32 or fp64].
    out: for inference (no gradient), a (B, D, L) tensor of u's dtype to write y into and return;
    it may be u itself, which the Triton kernels then overwrite without a second (B, D, L) buffer."""
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
              return_final_state=return_final_state, cu_seqlens=cu_seqlens)
    which = resolve_backend(backend, u if isinstance(u, torch.Tensor) else None)
    if out is not None:
        check_scan_out(out, u, delta, A, B, C, D, z, delta_bias, initial_state)
    if which == "triton":
        check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
        from .triton.scan_op import selective_scan_triton
        return selective_scan_triton(u, delta, A, B, C, **kw, out=out)
    result = (selective_scan_ref if which == "reference" else selective_scan_chunked)(u, delta, A, B, C, **kw)
    if out is None:
        return result
    y, final = result if return_final_state else (result, None)
    out.copy_(y)
    return (out, final) if return_final_state else out


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, z: Tensor | None = None,
        dt_bias: Tensor | None = None, dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
        initial_state: Tensor | None = None, return_final_state: bool = False, cu_seqlens: Tensor | None = None,
        chunk_size: int = SSD_CHUNK_SIZE, *, backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The Mamba-2 (SSD) scan, as mamba_ssm's mamba_chunk_scan_combined. x, z: (batch, L, H, P);
    dt: (batch, L, H); A, dt_bias: (H,); B, C: (batch, L, G, N) with G dividing H; D: (H,) or (H, P);
    dt_limit: (lo, hi) clamp of the step sizes ((0, inf): none); initial_state (batch, H, P, N), or
    (S, H, P, N) with cu_seqlens (int (S+1,) offsets, batch 1). Returns y (batch, L, H, P) in x's
    dtype [, final_state (batch or S, H, P, N), fp32 or fp64]. CUDA tensors of fp16/bf16/fp32 run the
    Triton kernels (triton/ssd_op.py), others the chunked torch path (ssd.py); backend="reference"
    runs the sequential spec (reference.py)."""
    which = resolve_backend(backend, x if isinstance(x, torch.Tensor) else None)
    check_chunk_size(chunk_size)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
              return_final_state=return_final_state, cu_seqlens=cu_seqlens)
    if which == "reference":
        return ssd_ref(x, dt, A, B, C, **kw)
    if which == "triton":
        check_ssd_args(x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, cu_seqlens)
        from .triton.ssd_op import ssd_triton
        return ssd_triton(x, dt, A, B, C, **kw, chunk_size=chunk_size)
    return ssd_chunked(x, dt, A, B, C, **kw, chunk_size=chunk_size)


def selective_scan_dt_proj(u: Tensor, dt: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                           delta_softplus: bool = False, initial_state: Tensor | None = None,
                           return_final_state: bool = False, cu_seqlens: Tensor | None = None, *,
                           backend: str | None = None, out: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """selective_scan(u, Δ, ...) with Δ = dt_weight @ dt formed inside: dt (B, R, L) is the low-rank
    step input and dt_weight (D, R) the mixer's dt_proj weight (its bias is delta_bias). With the
    Triton backend, training keeps dt instead of Δ for the backward and forms Δ again there: one
    (B, D, L) tensor less held per layer. Elsewhere it is exactly the composition below. `out`:
    as selective_scan's (inference only; it may be u itself)."""
    which = resolve_backend(backend, u if isinstance(u, torch.Tensor) else None)
    check_dt_proj_args(u, dt, dt_weight)
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
              return_final_state=return_final_state, cu_seqlens=cu_seqlens)
    if which != "triton" or out is not None:  # out: inference, where the composition is what runs
        return selective_scan(u, batched_linear(dt_weight, dt), A, B, C, **kw, backend=which, out=out)
    check_scan_args(u, u, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)  # Δ has u's shape: dt checked above
    from .triton.scan_op import selective_scan_dt_proj_triton
    return selective_scan_dt_proj_triton(u, dt, dt_weight, A, B, C, **kw)


def conv_proj_scan(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor,
                   dt_proj_weight: Tensor, A: Tensor, D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, cu_seqlens: Tensor | None = None, *, backend: str | None = None,
                   gate_in_x: bool = False) -> Tensor:
    """A Mamba mixer from its conv input to its gated scan output, without states in or out:
    u = SiLU(causal_conv1d(x)), (dt, B, C) = x_proj_weight @ u split as (R, N, N), then
    selective_scan_dt_proj(u, dt, dt_proj_weight, A, B, C, D, z, delta_bias, softplus).
    x, z: (B, D, L); conv_weight (D, K); x_proj_weight (R + 2N, D); dt_proj_weight (D, R);
    A (D, N). Returns y (B, D, L). gate_in_x: x is in_proj's whole output xz (B, 2D, L), the
    conv input then the gate, and z is None; x's gradient then comes back as one tensor in xz's
    own layout. With the Triton backend, eager training holds the conv's input for the backward
    instead of its output and runs the conv again there (one (B, D, L) tensor less per layer);
    everywhere else it is exactly that composition."""
    which = resolve_backend(backend, x if isinstance(x, torch.Tensor) else None)
    xc, gate = _split_gate(x, z, conv_weight, gate_in_x)
    check_conv_proj_scan_args(xc, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, gate, delta_bias,
                              cu_seqlens)
    if which == "triton":
        from .triton.conv_scan_op import conv_proj_scan_triton, eager_training
        if eager_training((x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias)):
            return conv_proj_scan_triton(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z,
                                         delta_bias, cu_seqlens, gate_in_x=gate_in_x)
    n = A.shape[1]
    u = causal_conv1d(xc, conv_weight, conv_bias, "silu", cu_seqlens=cu_seqlens, backend=which)  # (B, D, L)
    x_dbl = batched_linear(x_proj_weight, u)  # (B, R + 2N, L)
    dt, B, C = x_dbl.split([x_dbl.shape[1] - 2 * n, n, n], dim=1)
    inference = no_autograd(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, z, delta_bias)
    return selective_scan_dt_proj(u, dt, dt_proj_weight, A, B, C, D=D, z=gate, delta_bias=delta_bias,
                                  delta_softplus=True, cu_seqlens=cu_seqlens, backend=which,
                                  out=u if inference else None)  # inference: y over u, a buffer less


def _split_gate(x, z, conv_weight, gate_in_x: bool):
    """conv_proj_scan's (conv input, gate): x and z, or with gate_in_x the halves of x (B, 2D, L)."""
    if not gate_in_x:
        return x, z
    if z is not None:
        raise ValueError("conv_proj_scan(gate_in_x=True) takes the gate in x's second half; z must be None")
    dim = conv_weight.shape[0] if isinstance(conv_weight, torch.Tensor) and conv_weight.ndim == 2 else None
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or dim is None or x.shape[1] != 2 * dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"with gate_in_x=True, x must have shape (B, 2D, L) with D from conv_weight (D, K) "
                         f"= {dim}, got {got}")
    return x[:, :dim], x[:, dim:]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  initial_state: Tensor | None = None, return_final_state: bool = False,
                  cu_seqlens: Tensor | None = None, *, backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """x: (B, D, L); weight: (D, K); bias: (D,); initial_state: (B, D, K-1), or (S, D, K-1) with
    cu_seqlens. Returns y (B, D, L) [, final_state (B or S, D, K-1)].
    None picks the fused Triton kernel for CUDA tensors and the torch path elsewhere."""
    which = resolve_backend(backend, x if isinstance(x, torch.Tensor) else None)
    if which == "triton":
        check_conv_args(x, weight, bias, activation, initial_state, cu_seqlens)
        from .triton.conv_op import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, activation, initial_state, return_final_state, cu_seqlens)
    fn = causal_conv1d_ref if which == "reference" else causal_conv1d_torch
    return fn(x, weight, bias, activation, initial_state, return_final_state, cu_seqlens)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False, *, backend: str | None = None) -> Tensor:
    """One decoding step, as mamba_ssm's: `state` (B, D, N) is updated in place; returns y (B, D).
    x, dt, z: (B, D); A: (D, N); B, C: (B, N) or (B, G, N); D, dt_bias: (D,). None picks the
    fused Triton kernel for CUDA tensors, torch elsewhere."""
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    which = resolve_backend(backend, state)
    if which == "reference":
        y, new_state = selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state.copy_(new_state)
        return y
    if which == "triton":
        from .triton.step import state_update_
        return state_update_(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _state_update_torch_(state, x, dt, A.to(state.dtype), B, C,
                                None if D is None else D.to(state.dtype), z,
                                None if dt_bias is None else dt_bias.to(state.dtype), dt_softplus)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None, *, backend: str | None = None) -> Tensor:
    """One decoding step: `conv_state` (B, D, K-1) is shifted in place; returns y (B, D). None
    picks the fused Triton kernel for CUDA tensors, torch elsewhere."""
    check_conv_update_args(x, conv_state, weight, bias, activation)
    which = resolve_backend(backend, x)
    if which == "reference":
        y, new_state = causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
        conv_state.copy_(new_state)
        return y
    if which == "triton":
        from .triton.step import conv_update_
        return conv_update_(x, conv_state, weight, bias, activation)
    return _conv_update_torch_(x, conv_state, weight, bias, activation)


def ssd_state_update_(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                      dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf), *,
                      backend: str | None = None) -> Tensor:
    """Mamba-2's decoding step, in place on state (batch, H, P, N): x, z (batch, H, P), dt
    (batch, H), A (H,), B/C (batch, G, N), D (H,) or (H, P) -> y (batch, H, P) in x's dtype,
    computed from the new state in fp32 before it is stored in the state's dtype. The spec is
    `ssd_state_update_ref` (`ssd_ref` over one token). CUDA states run the fused Triton step
    (triton/ssd_step.py), others the torch step (step.py)."""
    check_ssd_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, dt_limit)
    if resolve_backend(backend, state) == "triton" and state.stride(-1) == 1:
        from .triton.ssd_step import ssd_state_update_triton_
        return ssd_state_update_triton_(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, tuple(dt_limit))
    return _ssd_state_update_torch_(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, tuple(dt_limit))


def selective_state_update_(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                            dt_softplus: bool = False) -> Tensor:
    """The unchecked decoding update that Mamba.step calls: the fused Triton kernel on CUDA,
    the in-place torch ops elsewhere."""
    if _backend.fused_kernels_for(state):
        from .triton.step import state_update_
        return state_update_(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _state_update_torch_(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def dt_proj_state_update_(state: Tensor, x: Tensor, dt_low_rank: Tensor, dt_weight: Tensor, dt_bias: Tensor | None,
                          A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None) -> Tensor:
    """The mixer's decoding update with its dt_proj and A folded in: Δ = softplus(dt_low_rank @
    dt_weight.T + dt_bias), A = -exp(A_log). One fused Triton kernel on CUDA (A formed in it, so
    a CUDA-graph step launches nothing for it); a linear then the torch update elsewhere.
    Unchecked, like selective_state_update_."""
    if _backend.fused_kernels_for(state):
        from .triton.step import state_update_
        return state_update_(state, x, dt_low_rank, A_log, B, C, D, z, dt_bias, True, dt_weight=dt_weight,
                             a_is_log=True)
    dt = torch.nn.functional.linear(dt_low_rank, dt_weight, dt_bias)
    A = -torch.exp(A_log if A_log.dtype == torch.float64 else A_log.float())
    return _state_update_torch_(state, x, dt, A, B, C, D, z, None, True)


def causal_conv1d_update_(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                          activation: str | None = None) -> Tensor:
    """The unchecked conv update that Mamba.step calls (Triton on CUDA, torch elsewhere)."""
    if _backend.fused_kernels_for(x) and conv_state.stride(-1) == 1:
        from .triton.step import conv_update_
        return conv_update_(x, conv_state, weight, bias, activation)
    return _conv_update_torch_(x, conv_state, weight, bias, activation)


def gated_rms_norm(x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int,
                   norm_before_gate: bool = False, *, backend: str | None = None) -> Tensor:
    """Mamba-2's gated, grouped RMSNorm (`gated_rms_norm_ref`): x, z (..., dim), weight (dim,);
    group_size divides dim. CUDA inputs run one Triton kernel each way (triton/gated_norm.py)."""
    dim = x.shape[-1]
    if not isinstance(group_size, int) or group_size < 1 or dim % group_size:
        raise ValueError(f"gated_rms_norm: group_size must be a positive divisor of x's last dim {dim}, got {group_size!r}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z has shape {tuple(z.shape)}, x {tuple(x.shape)}; they must match")
    if weight.shape != (dim,):
        raise ValueError(f"gated_rms_norm: weight has shape {tuple(weight.shape)}, expected ({dim},)")
    if resolve_backend(backend, x) == "triton" and group_size <= 8192:
        from .triton.gated_norm import gated_rms_norm_triton
        return gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate)
    return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_dtype: torch.dtype, out_dtype: torch.dtype | None = None, *, backend: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's residual add and RMSNorm in one pass: r = residual + hidden (kept in
    residual_dtype), y = RMSNorm(r in weight's dtype) rounded to the weight's dtype, then to
    out_dtype when given (autocast's: the rounding the next GEMM would apply). hidden, residual:
    (..., dim), rows may be strided with a unit-stride last axis; weight (dim,). Returns (y, r).
    None picks the fused Triton kernel for CUDA tensors (not fp64) and the torch composition
    `add_rms_norm_ref` elsewhere. No autograd through the kernel: for inference and decoding."""
    which = resolve_backend(backend, hidden)
    if which == "triton":
        from .triton.norm import add_rms_norm as fused
        return fused(hidden, residual, weight, eps, residual_dtype, out_dtype)
    return add_rms_norm_ref(hidden, residual, weight, eps, residual_dtype, out_dtype)


def patchify(x: torch.Tensor, patch: int, dtype: torch.dtype | None = None, *, backend: str | None = None
             ) -> torch.Tensor:
    """Images x (B, C, H, W) -> patch rows (B, (H/p)*(W/p), C*p*p) in `dtype` (x's by default),
    each patch flattened in (channel, y, x) order as a Conv2d of kernel = stride = p flattens its
    weight. None picks the Triton copy for CUDA images with unit stride along W and a patch that
    is a power of two, and `patchify_ref` (a reshape and permute) elsewhere."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"patchify: x must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or x.shape[2] % patch or x.shape[3] % patch:
        raise ValueError(f"patchify: patch must be an int >= 1 dividing H={x.shape[2]} and W={x.shape[3]}, "
                         f"got {patch!r}")
    which = resolve_backend(backend, x)
    if which == "triton" and backend is None and (x.stride(3) != 1 or patch & (patch - 1)):
        which = "torch"  # the kernel copies whole rows of power-of-two patches
    if which == "triton":
        from .triton.patchify import patchify as fused
        return fused(x, patch, dtype)
    return patchify_ref(x, patch, dtype)
