"""BiMamba's inference path on the Triton kernels: both directions over padded token rows,
nothing flipped (see `padded_inference`), and the weights it uses, made once per version of
the parameters (`padded_weights`)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The scans run on the Gluon kernel (ops/triton/scan_gluon.py) where it takes the tensors, on
# CUDA; MAMBAKIT_GLUON_SCAN=0 keeps the Triton lanes kernel (for A/B runs)
_GLUON_SCAN = os.environ.get("MAMBAKIT_GLUON_SCAN", "1") != "0"


@functools.cache
def _gluon():
    """The Gluon scan's (gluon_fits, gluon_scan), or None where this Triton has no Gluon or the
    GPU is not NVIDIA's (the kernel's SiLU is PTX). Resolved once."""
    if not _GLUON_SCAN or torch.version.hip is not None:
        return None
    try:
        from ..ops.triton.scan_gluon import gluon_fits, gluon_scan
    except ImportError:
        return None
    return gluon_fits, gluon_scan


@dataclass
class PaddedWeights:
    """A BiMamba's weights in the form and dtype the padded path uses. Per direction (forward,
    backward): x_proj (R + 2N, D), dt_proj (D, R), A = -exp(A_log), D and dt_proj's bias in fp32.
    conv (2D, K_conv) and its bias stack the two directions; out is out_proj's weight, and
    out_scale 1/2 with divide_out (the backward scan adds the two directions and scales their sum)."""
    key: tuple
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


def padded_weights(mixer, dtype: torch.dtype) -> PaddedWeights:
    """The mixer's PaddedWeights in `dtype`, kept on the mixer and made again when any parameter
    changes (its storage or its in-place version: an optimizer step, load_state_dict, .to())."""
    params = tuple(mixer.parameters())
    # parameters made under inference_mode keep no version counter: made again every call
    keep = not any(p.is_inference() for p in params)
    key = (dtype,) + tuple((p.data_ptr(), p._version) for p in params) if keep else None
    cached = mixer.__dict__.get("_padded_weights")
    if keep and cached is not None and cached.key == key:
        return cached
    cast = lambda t: None if t is None else t.detach().to(dtype).contiguous()  # noqa: E731
    fp32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    with torch.no_grad():
        w_in, b_in = mixer.in_proj.weight, mixer.in_proj.bias
        f, b = mixer.direction_params(False), mixer.direction_params(True)
        conv_b = None if f["conv1d"].bias is None else fp32(torch.cat([f["conv1d"].bias, b["conv1d"].bias]))
        weights = PaddedWeights(
            key=key, in_proj=cast(w_in), in_proj_bias=cast(b_in),
            conv=fp32(torch.cat([f["conv1d"].weight[:, 0], b["conv1d"].weight[:, 0]])), conv_bias=conv_b,
            x_proj=(cast(f["x_proj"].weight), cast(b["x_proj"].weight)),
            dt_proj=(cast(f["dt_proj"].weight), cast(b["dt_proj"].weight)),
            A=(fp32(-torch.exp(f["A_log"].float())), fp32(-torch.exp(b["A_log"].float()))),
            D=(fp32(f["D"]), fp32(b["D"])), dt_bias=(fp32(f["dt_proj"].bias), fp32(b["dt_proj"].bias)),
            out=cast(mixer.out_proj.weight), out_bias=cast(mixer.out_proj.bias),
            out_scale=0.5 if mixer.divide_out else 1.0)
    mixer.__dict__["_padded_weights"] = weights if keep else None
    return weights


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """autocast's dtype where autocast is on for hidden's device, else hidden's own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def padded_inference(mixer, hidden: torch.Tensor, length: int) -> torch.Tensor:
    """hidden (B, Lp, d_model), Lp a multiple of 16 and the steps from `length` on padding ->
    (B, Lp, d_model). Every activation from in_proj on is batch-major (B, C, Lp), time
    contiguous, so the conv reads and writes rows of aligned runs of steps, each sequence's row
    of Lp steps is an aligned vector run for the scan, and z, x_proj and out_proj are batched
    products a sequence. (Against columns (C, B*Lp), which made z and out_proj single GEMMs over
    the tokens: Vim-Ti at 1024 px, batch 64, 63.75 -> 62.80 ms on the H200, the forward scan
    0.742 -> 0.713 ms; results/tune_vim_session13_h200.jsonl and BENCHMARKS.md.) The backward
    direction runs anti-causally (conv) and backward in time (scan) over the tokens as they lie
    (ops/triton/bidirectional.py), so nothing is flipped.

    x_proj and Δ come from one kernel (ops/triton/x_proj_delta.py): B and C as (B, 2N, Lp), their
    state stride fixed at Lp, which the scan compiles in (a thread's state rows are then one
    address plus immediate offsets), and Δ after dt_proj's bias and softplus, so the scan, bound
    by its special-function unit, spends it on exp(ΔA) alone. The forward
    scan writes y_f + D u (ungated) over its input; the backward scan adds it to its own and
    gates once, (y_f + y_b) SiLU(z) / 2, over the forward's rows, so out_proj reads D_inner
    channels."""
    from ..ops.triton.bidirectional import bidirectional_conv
    from ..ops.triton.x_proj_delta import x_proj_delta
    from ..ops.triton.selective_scan import scan_fwd
    batch, padded, _ = hidden.shape
    if padded % 16:
        raise ValueError(f"padded_inference: the padded length {padded} must be a multiple of 16")
    di, n = mixer.d_inner, mixer.d_state
    dtype = compute_dtype(hidden)
    w = padded_weights(mixer, dtype)
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
                scan_fwd(*args, None, None, None, False, None, False, out=u, fixed_bc_stride=True)
        else:  # the reversed scan: gated, the forward output added, scaled, into y_f
            if gluon_fits and gluon_fits(*args, z=z, add=y_f, out=y_f):
                gluon_scan(*args, z=z, add=y_f, out=y_f, reverse=True, out_scale=w.out_scale, check=False)
            else:
                scan_fwd(*args, z, None, None, False, None, False, out=y_f, reverse=True, add=y_f,
                         out_scale=w.out_scale, fixed_bc_stride=True)
        del bc, delta, B_, C_, args  # freed before the next direction's Δ and out_proj's output
    # x, z and Δ freed before out_proj's output exists: kept, they made the layer's peak (Vim-Ti at
    # 1024 px, batch 64: 2.334 against 2.263 GiB)
    del xz, x, z, delta_buf
    out = torch.bmm(y_f.transpose(1, 2), w.out.t().expand(batch, di, w.out.shape[0]))  # (B, Lp, d_model)
    return out if w.out_bias is None else out + w.out_bias
