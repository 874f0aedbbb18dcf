"""Launching the selective scan's kernels: `scan_fwd` and `scan_bwd` for the op (training and
prefill: causal, packed sequences, saved states), and `scan_inference` for Vision's padded path
(either direction, an output added in and scaled, B/C's stride compiled in; nothing saved).

Each launcher asks `scan_plan.plan_scan` once for the whole plan, prepares the operands (strides
it can read, outputs it writes), launches the segments' summary kernel where the plan cuts the
sequence into segments, then the main kernel (scan_kernels.py)."""

from __future__ import annotations

import torch

from .launch import launch
from .scan_kernels import scan_bwd_kernel, scan_fwd_kernel
from .scan_plan import KernelLaunch, ScanPlan, plan_scan
from .scan_segments import bwd_summary_kernel, fwd_summary_kernel


# ---- operands ---------------------------------------------------------------------------------

def time_offsets_fit(t: torch.Tensor | None) -> bool:
    """Whether every offset along time, t * stride(L), fits the kernels' 32-bit arithmetic (row
    offsets are 64-bit). A time-major view, (B, L, D) read as (B, D, L), has stride D along L:
    at D = 2560 it overflows past L = 838,860."""
    return t is None or (t.shape[-1] - 1) * abs(t.stride(-1)) < 2**31


def _time_safe(t):
    """t, or a contiguous copy of it where its time offsets would overflow (`time_offsets_fit`):
    a rare case that costs one copy, never a wrong answer."""
    return t if time_offsets_fit(t) else t.contiguous()


def _bc_operands(B, C):
    """B and C as the kernels read them: through one shared set of strides (so slices of one
    x_proj output, with equal strides, need no copy); otherwise both made contiguous."""
    if B.stride() == C.stride() and time_offsets_fit(B):
        return B, C
    return B.contiguous(), C.contiguous()


def _contig(t):
    return None if t is None else t.contiguous()


def _strides(t):
    return (0, 0, 0) if t is None else t.stride()


def dbc_dtype(B, C) -> torch.dtype:
    """The dtype in which scan_bwd returns dB and dC: theirs when they share one (one rounding of
    the fp32 sums, in the same launch for both), else fp32."""
    return B.dtype if B.dtype == C.dtype else torch.float32


# ---- forward ------------------------------------------------------------------------------------

def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, cu_seqlens, save_states,
             *, out=None, lanes=None):
    """Returns out (b, D, L) in u's dtype, final_state (S, D, N) fp32, and the saved chunk-start
    states (for scan_bwd) or None. `out`: a (b, D, L) tensor of u's dtype to write the output
    into, which may be u itself (the kernels read each chunk of u before they write the same
    chunk of the output, and each program owns its rows); written through a fresh tensor where
    its time offsets do not fit. `lanes`: a tuning sweep's kernel meta-parameters."""
    if out is not None and not time_offsets_fit(out):
        y, final, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                    cu_seqlens, save_states, lanes=lanes)
        return out.copy_(y), final, states
    A, D, delta_bias = map(_contig, (A, D, delta_bias))  # u, delta, z are read through their strides
    u, delta, z = _time_safe(u), _time_safe(delta), _time_safe(z)
    B, C = _bc_operands(B, C)
    plan = plan_scan(u, B, A, cu_seqlens, lanes)
    return _forward(plan, plan.forward, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                    cu_seqlens, save_states, out, None, {})


def scan_inference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   *, out=None, reverse=False, add=None, out_scale=1.0, fixed_bc_stride=False, lanes=None):
    """An inference scan of dense inputs (nothing saved for a backward), with what Vision
    Mamba's padded path needs. Returns (out (b, D, L), final_state (b, D, N) fp32).
    - `reverse`: scan from step L-1 down to 0; final_state is then the state after step 0.
    - `add` (b, D, L) and `out_scale`: out = out_scale * (y + D u + add) * SiLU(z); `add` may be
      `out` itself (Vision Mamba adds its two directions this way).
    - `fixed_bc_stride`: compile B and C's stride between states into the kernel (fewer address
      instructions; one compilation per stride, so only for a layout that stays fixed).
    - `out`: as scan_fwd's; it may be u itself."""
    if add is not None and add.shape != u.shape:
        raise ValueError(f"scan_inference: add has shape {tuple(add.shape)}, the output {tuple(u.shape)}")
    if out is not None and not time_offsets_fit(out):
        y, final = scan_inference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                  reverse=reverse, add=add, out_scale=out_scale, fixed_bc_stride=fixed_bc_stride,
                                  lanes=lanes)
        return out.copy_(y), final
    A, D, delta_bias = map(_contig, (A, D, delta_bias))
    u, delta, z = _time_safe(u), _time_safe(delta), _time_safe(z)
    B, C = _bc_operands(B, C)
    plan = plan_scan(u, B, A, None, lanes)
    if reverse and plan.forward.seg_len:
        return _reverse_by_flipping(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, out, add,
                                    out_scale, lanes)
    extras = {}
    if add is not None or out_scale != 1.0 or fixed_bc_stride:
        extras = dict(OUT_SCALE=float(out_scale), HAS_ADD=add is not None,
                      BN_STRIDE=plan.bc_strides[2] if fixed_bc_stride else 0)
    kernel = plan.inference(B, C, reverse, fixed_bc_stride, lanes)
    out, final, _ = _forward(plan, kernel, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                             None, False, out, add, extras)
    return out, final


def _forward(plan: ScanPlan, kernel: KernelLaunch, u, delta, A, B, C, D, z, delta_bias, initial_state,
             delta_softplus, cu_seqlens, save_states, out, add, extras: dict):
    """The forward's launches (operands already prepared), for scan_fwd and scan_inference.
    `extras`: scan_inference's meta-parameters (OUT_SCALE, HAS_ADD, BN_STRIDE), empty for scan_fwd."""
    init = None if initial_state is None else initial_state.float().contiguous()
    if out is None:
        out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if add is not None and add.stride() != out.stride():  # the kernel reads add through out's strides
        add = torch.empty_strided(out.shape, out.stride(), dtype=add.dtype, device=add.device).copy_(add)
    final = torch.empty(plan.n_seqs, plan.dim, plan.d_state, device=u.device, dtype=torch.float32)
    states = (torch.empty(plan.state_rows, plan.dim, plan.d_state, device=u.device, dtype=plan.states_dtype)
              if save_states else None)
    dummy = final
    if extras:
        extras = {**extras, "add_ptr": add if add is not None else dummy}
    segs = {}
    if kernel.seg_len:  # pass 1: every segment's local final state and Σ Δ
        seg_h = torch.empty(kernel.grid[0], plan.dim, plan.d_state, device=u.device, dtype=torch.float32)
        seg_dt = torch.empty(kernel.grid[0], plan.dim, device=u.device, dtype=torch.float32)
        launch(fwd_summary_kernel, kernel.grid, [
            u, delta, A, B, delta_bias if delta_bias is not None else dummy, seg_h, seg_dt,
            plan.length, plan.dim, plan.d_state, plan.channels_per_group, kernel.n_segs, kernel.seg_len,
            *u.stride(), *delta.stride(), *plan.bc_strides],
            dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), BLOCK_N=plan.block_n,
                 **kernel.summary_meta))
        segs = dict(seg_h_ptr=seg_h, seg_dt_ptr=seg_dt, n_segs=kernel.n_segs, seg_len=kernel.seg_len,
                    SEGMENTED=True)
    chunk_base = plan.chunk_base(cu_seqlens)
    launch(scan_fwd_kernel, kernel.grid, [
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, init if init is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy, out, final, states if states is not None else dummy,
        chunk_base if chunk_base is not None else dummy,
        plan.length, plan.dim, plan.d_state, plan.channels_per_group,
        *u.stride(), *delta.stride(), *_strides(z), *plan.bc_strides, *out.stride(), plan.n_chunks,
    ], dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_INIT=init is not None,
            SOFTPLUS=bool(delta_softplus), VARLEN=cu_seqlens is not None, SAVE_STATES=bool(save_states),
            BLOCK_N=plan.block_n, BLOCK_L=plan.save_every, **kernel.meta, **segs, **extras))
    return out, final, states


def _reverse_by_flipping(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, out, add, out_scale,
                         lanes):
    """The reversed scan as the forward scan of the time-flipped inputs, flipped back: where the
    forward cuts its few rows into segments scanned in parallel (the reversed kernel has no
    segments, so one warp would walk each whole row: 1.55 against 0.49 ms at 2 x 1536 x 8192).
    The flips copy u, Δ, z, B, C and y once each, which at so few rows costs little."""
    flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
    y, final = scan_inference(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                              initial_state, add=flip(add), out_scale=out_scale, lanes=lanes)
    y = y.flip(-1)
    return (y if out is None else out.copy_(y)), final


# ---- backward -----------------------------------------------------------------------------------

def _grad_buffers(u, delta, z, grads_out):
    """du, ddelta, dz (B, D, L), in the dtypes of u, delta and z, which the kernel writes
    through one set of strides: contiguous, or du and dz are `grads_out`'s tensors (ddelta
    then gets their strides) when those share strides and dtypes fit."""
    if grads_out is not None:
        du, dz = grads_out
        fits = (du.shape == u.shape and du.dtype == u.dtype and time_offsets_fit(du)
                and (z is None if dz is None else (dz.shape == u.shape and dz.dtype == z.dtype
                                                   and dz.stride() == du.stride())))
        if fits:
            return du, torch.empty_strided(u.shape, du.stride(), device=u.device, dtype=delta.dtype), dz
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)  # (B, D, L), contiguous
    ddelta = torch.empty(u.shape, device=u.device, dtype=delta.dtype)
    dz = torch.empty(u.shape, device=u.device, dtype=z.dtype) if z is not None else None
    return du, ddelta, dz


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, chunk_states, dout, dfinal,
             *, lanes=None, grads_out=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit): du, ddelta and dz in the
    dtypes of u, delta and z (the kernel accumulates in fp32 and rounds once on the store); dB
    and dC in B's dtype; the rest in fp32. grads_out: (du, dz or None), (B, D, L) tensors with
    one set of strides, for the kernel to write du and dz into (slices of one buffer laid out as
    the caller's gradient must be, for example); where they do not fit (`_grad_buffers`), du
    and dz are fresh and the caller must check what came back."""
    A, D, delta_bias = map(_contig, (A, D, delta_bias))  # u, delta, z, dout: read through their strides
    u, delta, z, dout = _time_safe(u), _time_safe(delta), _time_safe(z), _time_safe(dout)
    B, C = _bc_operands(B, C)
    plan = plan_scan(u, B, A, cu_seqlens, lanes)
    kernel = plan.backward
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta, dz = _grad_buffers(u, delta, z, grads_out)
    dinit = torch.empty(plan.n_seqs, plan.dim, plan.d_state, **f32)
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    segs = {}
    if kernel.seg_len:  # pass 1: the adjoint out of every segment's start (from zero) and Σ Δ
        seg_g = torch.empty(kernel.grid[0], plan.dim, plan.d_state, **f32)
        seg_dt = torch.empty(kernel.grid[0], plan.dim, **f32)
        launch(bwd_summary_kernel, kernel.grid, [
            delta, A, C, z if z is not None else seg_g, delta_bias if delta_bias is not None else seg_g, dout,
            seg_g, seg_dt, plan.length, plan.dim, plan.d_state, plan.channels_per_group, kernel.n_segs,
            kernel.seg_len, *delta.stride(), *_strides(z), *dout.stride(), *plan.bc_strides],
            dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                 BLOCK_N=plan.block_n, **kernel.summary_meta))
        segs = dict(seg_g_ptr=seg_g, seg_dt_ptr=seg_dt, n_segs=kernel.n_segs, seg_len=kernel.seg_len,
                    SEGMENTED=True)
    rows, n_dblocks = kernel.grid
    # per-program partial sums, reduced below in a fixed order (deterministic): over time, one
    # row per program span (sequence or segment) of [dA (D, N) | dD (D) | dΔ-bias (D)]; over
    # channels, dB and dC per channel block. The kernel writes every (row, n, t) of a dense
    # batch; packed sequences may leave entries unwritten, which must then read as zero.
    sums_part = torch.empty(rows, plan.dim * (plan.d_state + 2), **f32)
    alloc = torch.zeros if plan.varlen else torch.empty
    dBC_part = alloc(2, plan.batch, n_dblocks, plan.d_state, plan.length, **f32)  # dB, dC
    dummy = dinit
    chunk_base = plan.chunk_base(cu_seqlens)
    launch(scan_bwd_kernel, kernel.grid, [
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, cu_seqlens if cu_seqlens is not None else dummy,
        chunk_states, chunk_base if chunk_base is not None else dummy, dout, dfinal if dfinal is not None else dummy,
        du, ddelta, dz if dz is not None else dummy, dinit, sums_part, dBC_part[0], dBC_part[1],
        plan.length, plan.dim, plan.d_state, plan.channels_per_group, n_dblocks,
        *u.stride(), *delta.stride(), *_strides(z), *dout.stride(), *du.stride(), *plan.bc_strides, plan.n_chunks,
    ], dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DFINAL=dfinal is not None,
            SOFTPLUS=bool(delta_softplus), VARLEN=plan.varlen, BLOCK_N=plan.block_n, BLOCK_L=plan.save_every,
            **kernel.meta, **segs))
    blocks_per_group = plan.channels_per_group // kernel.meta["BLOCK_D"]
    if B.ndim == 3:  # (2, b, blocks, N, L) -> (2, b, N, L)
        dBC = dBC_part.view(2, plan.batch, blocks_per_group, plan.d_state, plan.length).sum(2)
    else:  # (2, b, G, blocks per group, N, L) -> (2, b, G, N, L)
        dBC = dBC_part.view(2, plan.batch, plan.groups, blocks_per_group, plan.d_state, plan.length).sum(3)
    dB, dC = dBC.to(dbc_dtype(B, C)).unbind(0)
    dA, dD, dbias = sums_part.sum(0).split_with_sizes([plan.dim * plan.d_state, plan.dim, plan.dim])
    return (du, ddelta, dA.view(plan.dim, plan.d_state), dB, dC, dD if D is not None else None, dz,
            dbias if delta_bias is not None else None, dinit)
