"""Vision Mamba's bidirectional layer at inference, fused: `bimamba_inference`.

Both directions run over padded token rows and nothing is flipped: the backward direction's
conv runs anti-causally and its scan backward in time over the tokens as they lie
(triton/bidirectional.py, scan_launch.scan_inference), and its scan adds the forward one's
output, gates and scales once. The readable reference is `reference.bimamba_inference_ref`:
two causal single-direction mixers, one of them on the time-flipped tokens.

The weights come in the form and dtype this path uses (`BiMambaWeights`); the layer
(modules/bimamba.py) makes them once per version of its parameters."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import knobs
from . import backend as _backend
from .reference import bimamba_inference_ref


@dataclass
class BiMambaWeights:
    """A bidirectional mixer's weights in one dtype (the compute dtype; fp32 where noted). Per
    direction (forward, backward): x_proj (R + 2N, D), dt_proj (D, R), A = -exp(A_log) (D, N)
    fp32, D (D,) fp32 and dt_proj's bias (D,) fp32. conv (2D, K) fp32 and its bias stack the two
    directions; in_proj (2D, d_model) makes x then z; out (d_model, D) is out_proj's weight,
    and out_scale 1/2 halves the sum of the directions (Vim's divide_out) or is 1. `key`
    identifies the parameters' versions they were made from (the layer's cache)."""
    key: tuple | None
    in_proj: torch.Tensor
    in_proj_bias: torch.Tensor | None
    conv: torch.Tensor
    conv_bias: torch.Tensor | None
    x_proj: tuple[torch.Tensor, torch.Tensor]
    dt_proj: tuple[torch.Tensor, torch.Tensor]
    A: tuple[torch.Tensor, torch.Tensor]
    D: tuple[torch.Tensor, torch.Tensor]
    dt_bias: tuple[torch.Tensor, torch.Tensor]
    out: torch.Tensor
    out_bias: torch.Tensor | None
    out_scale: float

    @property
    def d_inner(self) -> int:
        return self.out.shape[1]

    @property
    def d_state(self) -> int:
        return self.A[0].shape[1]


@functools.cache
def _gluon():
    """The Gluon scan's (gluon_fits, gluon_scan), or None where the knob turns it off, this Triton
    has no Gluon or the GPU is not NVIDIA's (the kernel's SiLU is PTX). Resolved once."""
    if not knobs.current().gluon_scan or torch.version.hip is not None:
        return None
    try:
        from .triton.scan_gluon import gluon_fits, gluon_scan
    except ImportError:
        return None
    return gluon_fits, gluon_scan


knobs.on_change(_gluon.cache_clear)


def bimamba_inference(hidden: torch.Tensor, weights: BiMambaWeights, length: int | None = None, *,
                      backend: str | None = None) -> torch.Tensor:
    """hidden (B, Lp, d_model), Lp a multiple of 16, the steps from `length` on padding ->
    (B, Lp, d_model) in the weights' dtype; the padding's own outputs are unspecified (finite).
    No autograd. None picks the fused Triton path for CUDA tensors (on CPU it runs under
    TRITON_INTERPRET=1 with backend="triton"); "reference" runs `bimamba_inference_ref`."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise ValueError(f"bimamba_inference: hidden must be a (B, Lp, d_model) tensor, got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    batch, padded, d_model = hidden.shape
    length = padded if length is None else length
    if not 1 <= length <= padded:
        raise ValueError(f"bimamba_inference: length {length} must be in [1, {padded}]")
    if d_model != weights.in_proj.shape[1]:
        raise ValueError(f"bimamba_inference: hidden has d_model {d_model}, in_proj takes {weights.in_proj.shape[1]}")
    which = _backend.resolve(backend, hidden)
    if which != "triton":
        return bimamba_inference_ref(hidden, weights, length)
    if padded % 16:
        raise ValueError(f"bimamba_inference: the padded length {padded} must be a multiple of 16")
    with torch.no_grad():
        return _padded(hidden, weights, length)


def _padded(hidden: torch.Tensor, w: BiMambaWeights, length: int) -> torch.Tensor:
    """Every activation from in_proj on is batch-major (B, C, Lp), time contiguous, so the conv
    reads and writes rows of aligned runs of steps, each sequence's row of Lp steps is an aligned
    vector run for the scan, and z, x_proj and out_proj are batched products a sequence. (Against
    columns (C, B*Lp), which made z and out_proj single GEMMs over the tokens: Vim-Ti at 1024 px,
    batch 64, 63.75 -> 62.80 ms on the H200, the forward scan 0.742 -> 0.713 ms.)

    x_proj and Δ come from one kernel (triton/x_proj_delta.py): B and C as (B, 2N, Lp), their
    state stride fixed at Lp, which the scan compiles in (a thread's state rows are then one
    address plus immediate offsets), and Δ after dt_proj's bias and softplus, so the scan, bound
    by its special-function unit, spends it on exp(ΔA) alone. The forward scan writes y_f + D u
    (ungated) over its input; the backward scan adds it to its own and gates once,
    (y_f + y_b) SiLU(z) / 2, over the forward's rows, so out_proj reads D_inner channels."""
    from .triton.bidirectional import bidirectional_conv
    from .triton.scan_launch import scan_inference
    from .triton.x_proj_delta import x_proj_delta
    batch, padded, _ = hidden.shape
    di, n = w.d_inner, w.d_state
    dtype = w.in_proj.dtype
    tokens_t = hidden.to(dtype).transpose(1, 2)  # (B, d_model, Lp)
    rows = hidden.new_empty(batch, 2 * di, padded, dtype=dtype)  # both directions' conv outputs; then y_f, the output
    if w.conv.shape[1] == 4:
        # the conv kernel over time rows has width 4 (Vim's): x and z (B, 2 D_inner, Lp) from one
        # batched product a sequence, time contiguous (the conv reads x as aligned runs of steps;
        # the scans read z as vectors). Once the conv has read x, each direction's Δ is written
        # over it, so the layer's peak is no larger than with x and z made one after the other
        xz = torch.bmm(w.in_proj.expand(batch, *w.in_proj.shape), tokens_t)
        if w.in_proj_bias is not None:
            xz += w.in_proj_bias[:, None]
        x, z = xz[:, :di].transpose(1, 2), xz[:, di:]  # (B, Lp, D_inner) view, (B, D_inner, Lp)
        bidirectional_conv(x, w.conv, w.conv_bias, length, rows)
        delta_buf = xz[:, :di]  # (B, D_inner, Lp), x no longer needed
    else:  # token rows (B, Lp, D_inner), for the conv's row shifts; z made once x is freed
        x = F.linear(tokens_t.transpose(1, 2), w.in_proj[:di], None if w.in_proj_bias is None else w.in_proj_bias[:di])
        bidirectional_conv(x, w.conv, w.conv_bias, length, rows)
        x = None  # freed before z exists
        z = torch.bmm(w.in_proj[di:].expand(batch, di, w.in_proj.shape[1]), tokens_t)
        if w.in_proj_bias is not None:
            z += w.in_proj_bias[di:, None]
        xz = delta_buf = None
    y_f = rows[:, :di]  # (B, D_inner, Lp)
    gluon_fits, gluon_scan = (_gluon() if rows.is_cuda else None) or (None, None)
    for k in (0, 1):
        u = rows[:, k * di:(k + 1) * di]  # (B, D_inner, Lp)
        # Δ (B, D_inner, Lp) after its softplus, and B, C (B, 2N, Lp), from one read of u
        delta, bc = x_proj_delta(u, w.x_proj[k], w.dt_proj[k], w.dt_bias[k], n, delta_out=delta_buf)
        B_, C_ = bc[:, :n], bc[:, n:]  # (B, N, Lp) each
        args = (u, delta, w.A[k], B_, C_, w.D[k])
        if k == 0:  # the forward scan, in place
            if gluon_fits and gluon_fits(*args, out=u):
                gluon_scan(*args, out=u, check=False)
            else:
                scan_inference(*args, out=u, fixed_bc_stride=True)
        else:  # the reversed scan: gated, the forward output added, scaled, into y_f
            if gluon_fits and gluon_fits(*args, z=z, add=y_f, out=y_f):
                gluon_scan(*args, z=z, add=y_f, out=y_f, reverse=True, out_scale=w.out_scale, check=False)
            else:
                scan_inference(*args, z, out=y_f, reverse=True, add=y_f, out_scale=w.out_scale, fixed_bc_stride=True)
        del bc, delta, B_, C_, args  # freed before the next direction's Δ and out_proj's output
    # x, z and Δ freed before out_proj's output exists: kept, they made the layer's peak (Vim-Ti at
    # 1024 px, batch 64: 2.334 against 2.263 GiB)
    del xz, x, z, delta_buf
    out = torch.bmm(y_f.transpose(1, 2), w.out.t().expand(batch, di, w.out.shape[0]))  # (B, Lp, d_model)
    return out if w.out_bias is None else out + w.out_bias
