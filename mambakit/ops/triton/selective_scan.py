"""The fused selective scan in Triton: forward and backward, with nothing to compile ahead.

This file holds the launchers (`scan_fwd`, `scan_bwd`) and the first ("tile3d") kernel pair.
The default kernels are the "lanes" pair in selective_scan_lanes.py; `kernel_layout()` picks.

One program owns BLOCK_D channels of one sequence and all N states, keeps the state h
(BLOCK_D, N) in registers, and walks L in chunks of BLOCK_L steps. In a chunk it loads u, Δ,
z (BLOCK_D, BLOCK_L) and B, C (N, BLOCK_L) once, forms exp(ΔA) and ΔBu for the whole chunk,
scans them with `tl.associative_scan` and folds in the carried state. Only the state at each
chunk start leaves the chip (for the backward pass), never the per-step states.

The backward pass walks the chunks in reverse, recomputes each chunk's states from its saved
start state, and runs the adjoint recurrence g_t = C_t dy_t + exp(Δ_{t+1}A) g_{t+1} as a
reverse scan. Reductions over channels (dB, dC) and over time (dA, dD, dΔ-bias) are written as
per-program partial sums and added by torch in a fixed order: no atomics, so the backward
is deterministic.

Packed sequences (`cu_seqlens`) map one program row to one sequence. Offsets are 64-bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .host import cdiv, next_power_of_2
from .launch import launch

LOG2E = 1.4426950408889634


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 on the special-function unit (one MUFU.LG2) when compiled; tl.log2 (a polynomial of
    a dozen FMAs) in the interpreter, which has no inline assembly."""
    if FAST:  # flush-to-zero: the callers' arguments are at least 1, never subnormal
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _widen(x, FAST: tl.constexpr):
    """x in fp32. With FAST, a bf16 tile is widened two values a 32-bit register, by one shift and
    one mask (a bf16 is the top half of the fp32 it rounds): Triton's conversion spends a PRMT and
    a shift on each high half (192 against 128 instructions for B and C a chunk in the lanes
    scan's sm_90 SASS, benchmarks/scan_sass.py). The interpreter, which has no inline assembly,
    and other dtypes convert as usual."""
    if FAST and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16;\n and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def _silu(x, FAST: tl.constexpr):
    """x * sigmoid(x); with FAST as x / (1 + 2^(-x log2 e)) on the special-function unit (MUFU.EX2,
    MUFU.RCP, flushing subnormals: a relative error of a few ulp) instead of tl.sigmoid's
    IEEE division."""
    if FAST:
        e = tl.exp2(x * -1.4426950408889634)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return x * r
    else:
        return x * tl.sigmoid(x)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """log(1 + e^x) as ln2 * log2(1 + 2^(x log2 e)): two special-function operations with FAST.
    Below x = -4 it is the series e - e^2/2 + e^3/3 of log1p(e) instead (relative error < e^3/4
    < 2e-6): in fp32, 1 + e rounds away e's low bits, which quantized small steps Δ in units of
    about 1e-7, while a state that must hold over 2^20 steps needs Δ of that order to be exact."""
    e = tl.exp2(x * 1.4426950408889634)
    series = e * (1.0 - e * (0.5 - e * 0.3333333333333333))
    return tl.where(x > 20.0, x, tl.where(x < -4.0, series, 0.6931471805599453 * _log2(1.0 + e, FAST)))


@triton.jit
def _seq_bounds(cu_seqlens_ptr, pid_s, L, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(cu_seqlens_ptr + pid_s).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + pid_s + 1).to(tl.int64)
        batch = pid_s * 0  # packed sequences share batch row 0
    else:
        start = 0
        end = L
        batch = pid_s
    return batch, start, end


@triton.jit
def _chunk_row(chunk_base_ptr, pid_s, n_chunks_max, chunk, VARLEN: tl.constexpr):
    """Row of the saved chunk-start states: dense sequences have n_chunks_max rows each; packed
    ones are laid end to end from their offsets (exclusive sums of their chunk counts)."""
    if VARLEN:
        base = tl.load(chunk_base_ptr + pid_s).to(tl.int64)
    else:
        base = pid_s.to(tl.int64) * n_chunks_max
    return base + chunk


@triton.jit
def _at(ptr, batch, offs_d, t, s_b, s_d, s_l):
    """Pointers to a (BLOCK_D, BLOCK_L) tile of a (batch, D, L) tensor with any strides."""
    return ptr + batch.to(tl.int64) * s_b + offs_d[:, None].to(tl.int64) * s_d + t[None, :].to(tl.int64) * s_l


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, bias_ptr, batch, row_bc, offs_d, offs_n, t, mask_d, mask_n,
                mask_t, s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bn, s_bl, A2,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, dt (BLOCK_D, BLOCK_L); B, C (BLOCK_N, BLOCK_L); dA, dBu (BLOCK_D, BLOCK_L, BLOCK_N)."""
    m_dl = mask_d[:, None] & mask_t[None, :]
    m_nl = mask_n[:, None] & mask_t[None, :]
    u = tl.load(_at(u_ptr, batch, offs_d, t, s_ub, s_ud, s_ul), mask=m_dl, other=0.0).to(tl.float32)
    dt_raw = tl.load(_at(delta_ptr, batch, offs_d, t, s_db, s_dd, s_dl), mask=m_dl, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    dt = _softplus(dt_raw, False) if SOFTPLUS else dt_raw
    dt = tl.where(m_dl, dt, 0.0)
    bn = offs_n[:, None] * s_bn + t[None, :] * s_bl
    Bt = tl.load(B_ptr + row_bc + bn, mask=m_nl, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + row_bc + bn, mask=m_nl, other=0.0).to(tl.float32)
    dA = tl.exp2(dt[:, :, None] * A2[:, None, :])  # (BLOCK_D, BLOCK_L, BLOCK_N); 1 where dt = 0
    dBu = (dt * u)[:, :, None] * tl.trans(Bt)[None, :, :]
    return u, dt_raw, dt, Bt, Ct, dA, dBu


@triton.jit
def _program_setup(cu_seqlens_ptr, A_ptr, L, dim, d_state, channels_per_group, s_bb, s_bg,
                   VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """What a program owns: its sequence [start, end), its channel block, its B/C group row,
    and A pre-scaled by log2(e) for exp2, (BLOCK_D, BLOCK_N)."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    batch, start, end = _seq_bounds(cu_seqlens_ptr, pid_s, L, VARLEN)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    m_dn = mask_d[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group  # BLOCK_D divides channels_per_group
    row_bc = batch.to(tl.int64) * s_bb + group * s_bg
    dn = offs_d[:, None] * d_state + offs_n[None, :]  # (BLOCK_D, BLOCK_N) into a (.., D, N) state
    A2 = tl.load(A_ptr + dn, mask=m_dn, other=0.0).to(tl.float32) * 1.4426950408889634
    return pid_s, pid_d, batch, start, end, offs_d, offs_n, offs_l, mask_d, mask_n, m_dn, row_bc, dn, A2


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, cu_seqlens_ptr,
    out_ptr, final_ptr, chunk_states_ptr, chunk_base_ptr,
    L, dim, d_state, channels_per_group,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_bb, s_bg, s_bn, s_bl, s_ob, s_od, s_ol, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, SAVE_STATES: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_s, pid_d, batch, start, end, offs_d, offs_n, offs_l, mask_d, mask_n, m_dn, row_bc, dn, A2 = _program_setup(
        cu_seqlens_ptr, A_ptr, L, dim, d_state, channels_per_group, s_bb, s_bg, VARLEN, BLOCK_D, BLOCK_N, BLOCK_L)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_row = pid_s.to(tl.int64) * dim * d_state
    if HAS_INIT:
        h = tl.load(init_ptr + state_row + dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, tl.cdiv(end - start, BLOCK_L)):
        t0 = start + chunk * BLOCK_L
        if SAVE_STATES:
            off = _chunk_row(chunk_base_ptr, pid_s, n_chunks_max, chunk, VARLEN) * dim * d_state
            tl.store(chunk_states_ptr + off + dn, h, mask=m_dn)
        t = t0 + offs_l
        mask_t = t < end
        u, dt_raw, dt, Bt, Ct, dA, dBu = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias_ptr, batch, row_bc, offs_d, offs_n, t, mask_d, mask_n, mask_t,
            s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bn, s_bl, A2, HAS_BIAS, SOFTPLUS)
        a_cum, b_cum = tl.associative_scan((dA, dBu), 1, _combine)
        hs = a_cum * h[:, None, :] + b_cum  # (BLOCK_D, BLOCK_L, BLOCK_N)
        y = tl.sum(hs * tl.trans(Ct)[None, :, :], axis=2)  # (BLOCK_D, BLOCK_L)
        if HAS_D:
            y += Dv[:, None] * u
        m_dl = mask_d[:, None] & mask_t[None, :]
        if HAS_Z:
            zz = tl.load(_at(z_ptr, batch, offs_d, t, s_zb, s_zd, s_zl), mask=m_dl, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(_at(out_ptr, batch, offs_d, t, s_ob, s_od, s_ol), y.to(out_ptr.dtype.element_ty), mask=m_dl)
        # the state after the chunk's last step (masked steps have dA = 1, dBu = 0: pass-through)
        h = tl.sum(tl.where((offs_l == BLOCK_L - 1)[None, :, None], hs, 0.0), axis=1)
    tl.store(final_ptr + state_row + dn, h, mask=m_dn)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_seqlens_ptr, chunk_states_ptr, chunk_base_ptr,
    dout_ptr, dfinal_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dinit_ptr, dpart_ptr, dB_part_ptr, dC_part_ptr,
    L, dim, d_state, channels_per_group, n_dblocks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_ob, s_od, s_ol,
    s_bb, s_bg, s_bn, s_bl, n_chunks_max,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DFINAL: tl.constexpr,
    SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_s, pid_d, batch, start, end, offs_d, offs_n, offs_l, mask_d, mask_n, m_dn, row_bc, dn, A2 = _program_setup(
        cu_seqlens_ptr, A_ptr, L, dim, d_state, channels_per_group, s_bb, s_bg, VARLEN, BLOCK_D, BLOCK_N, BLOCK_L)
    # u, delta, z, dout (s_g*) may have any strides; du, ddelta, dz are contiguous (s_o*)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_row = pid_s.to(tl.int64) * dim * d_state
    if HAS_DFINAL:
        carry = tl.load(dfinal_ptr + state_row + dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dL/dh at the chunk's end
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a_first = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(end - start, BLOCK_L)
    # partial sums for dB, dC: (B, n_dblocks, N, L); packed sequences cover disjoint t in row 0
    part_row = (batch.to(tl.int64) * n_dblocks + pid_d) * d_state * L
    for i in range(0, n_chunks):
        chunk = n_chunks - 1 - i
        t0 = start + chunk * BLOCK_L
        t = t0 + offs_l
        mask_t = t < end
        m_dl = mask_d[:, None] & mask_t[None, :]
        u, dt_raw, dt, Bt, Ct, dA, dBu = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, bias_ptr, batch, row_bc, offs_d, offs_n, t, mask_d, mask_n, mask_t,
            s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_bn, s_bl, A2, HAS_BIAS, SOFTPLUS)
        # exp(Δ_{t+1} A): the multiplier from g_{t+1} back to g_t; 1 at the sequence's last step
        mask_next = (t + 1) < end
        dt_next = tl.load(_at(delta_ptr, batch, offs_d, t + 1, s_db, s_dd, s_dl),
                          mask=mask_d[:, None] & mask_next[None, :], other=0.0)
        dt_next = dt_next.to(tl.float32)
        if HAS_BIAS:
            dt_next += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        if SOFTPLUS:
            dt_next = _softplus(dt_next, False)
        dt_next = tl.where(mask_d[:, None] & mask_next[None, :], dt_next, 0.0)
        a_next = tl.exp2(dt_next[:, :, None] * A2[:, None, :])  # 1 where dt_next = 0
        # recompute the chunk's states from its saved start state
        off = _chunk_row(chunk_base_ptr, pid_s, n_chunks_max, chunk, VARLEN) * dim * d_state
        h0 = tl.load(chunk_states_ptr + off + dn, mask=m_dn, other=0.0)
        a_cum, b_cum = tl.associative_scan((dA, dBu), 1, _combine)
        hs = a_cum * h0[:, None, :] + b_cum  # (BLOCK_D, BLOCK_L, BLOCK_N)
        CtT = tl.trans(Ct)[None, :, :]
        dout = tl.load(_at(dout_ptr, batch, offs_d, t, s_gb, s_gd, s_gl), mask=m_dl, other=0.0)
        dout = dout.to(tl.float32)
        if HAS_Z:
            zz = tl.load(_at(z_ptr, batch, offs_d, t, s_zb, s_zd, s_zl), mask=m_dl, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zz)
            y = tl.sum(hs * CtT, axis=2)
            if HAS_D:
                y += Dv[:, None] * u
            dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
            tl.store(_at(dz_ptr, batch, offs_d, t, s_ob, s_od, s_ol), dz.to(dz_ptr.dtype.element_ty), mask=m_dl)
            dy = dout * zz * sz
        else:
            dy = dout
        dy = tl.where(m_dl, dy, 0.0)
        # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, as a reverse scan, then fold in the carry
        x = dy[:, :, None] * CtT
        p_cum, g_part = tl.associative_scan((a_next, x), 1, _combine, reverse=True)
        g = g_part + p_cum * carry[:, None, :]
        first = (offs_l == 0)[None, :, None]
        carry = tl.sum(tl.where(first, g, 0.0), axis=1)
        a_first = tl.sum(tl.where(first, dA, 0.0), axis=1)
        # X_t = g_t a_t h_{t-1} = g_t (h_t - ΔBu_t): the gradient through a_t = exp(Δ_t A), times a_t
        X = g * (hs - dBu)
        BtT = tl.trans(Bt)[None, :, :]
        gB = tl.sum(g * BtT, axis=2)  # (BLOCK_D, BLOCK_L)
        ddt = tl.sum(X * (A2 * 0.6931471805599453)[:, None, :], axis=2) + gB * u
        du = gB * dt
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw)
        ddt = tl.where(m_dl, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        dA_acc += tl.sum(X * dt[:, :, None], axis=1)
        tl.store(_at(du_ptr, batch, offs_d, t, s_ob, s_od, s_ol), du.to(du_ptr.dtype.element_ty), mask=m_dl)
        tl.store(_at(ddelta_ptr, batch, offs_d, t, s_ob, s_od, s_ol), ddt.to(ddelta_ptr.dtype.element_ty), mask=m_dl)
        # partial sums over this program's channels: dB_t = Σ_d g Δ u, dC_t = Σ_d dy h
        dB_t = tl.sum(g * (dt * u)[:, :, None], axis=0)  # (BLOCK_L, BLOCK_N)
        dC_t = tl.sum(hs * dy[:, :, None], axis=0)
        nl = offs_n[None, :] * L + t[:, None]
        m_ln = mask_t[:, None] & mask_n[None, :]
        tl.store(dB_part_ptr + part_row + nl, dB_t, mask=m_ln)
        tl.store(dC_part_ptr + part_row + nl, dC_t, mask=m_ln)
    tl.store(dinit_ptr + state_row + dn, carry * a_first, mask=m_dn)
    sum_row = pid_s.to(tl.int64) * dim * (d_state + 2)  # [dA (D, N) | dD (D) | dΔ-bias (D)], summed by torch
    tl.store(dpart_ptr + sum_row + dn, dA_acc, mask=m_dn)
    tl.store(dpart_ptr + sum_row + dim * d_state + offs_d, dD_acc, mask=mask_d)
    tl.store(dpart_ptr + sum_row + dim * (d_state + 1) + offs_d, dbias_acc, mask=mask_d)


# ---- launching -------------------------------------------------------------------------------

KERNELS = ("lanes", "tile3d", "by_state")


def kernel_layout() -> str:
    """Which kernels run: "lanes" (the forward of selective_scan_lanes.py with this file's
    backward; the default), "tile3d" (this file's pair) or "by_state"
    (selective_scan_by_state.py). Set MAMBAKIT_SCAN_KERNEL to choose."""
    name = os.environ.get("MAMBAKIT_SCAN_KERNEL", "lanes")
    if name not in KERNELS:
        raise ValueError(f"MAMBAKIT_SCAN_KERNEL must be one of {KERNELS}, got {name!r}")
    return name


_KERNELS: dict = {}


def _kernels(layout: str):
    """(forward kernel, backward kernel) of a layout."""
    pair = _KERNELS.get(layout)
    if pair is None:
        if layout == "by_state":
            from .selective_scan_by_state import _bwd_kernel_by_state, _fwd_kernel_by_state
            pair = _fwd_kernel_by_state, _bwd_kernel_by_state
        elif layout == "lanes":
            from .selective_scan_lanes import _bwd_kernel_lanes, _fwd_kernel_lanes
            pair = _fwd_kernel_lanes, _bwd_kernel_lanes
        else:
            pair = _fwd_kernel, _bwd_kernel
        _KERNELS[layout] = pair
    return pair

def _block_d(channels_per_group: int, d_state: int) -> int:
    """Channels per program: a power of two dividing the group size (so that one program reads
    one group's B and C), smaller for large N to bound the (BLOCK_D, BLOCK_L, N) registers."""
    limit = max(1, 4096 // (32 * next_power_of_2(d_state)))
    block = 1
    while block * 2 <= min(limit, 16) and channels_per_group % (block * 2) == 0:
        block *= 2
    return block


def _time_offsets_fit(t) -> bool:
    """Whether every offset along time, t * stride(L), fits the 32-bit arithmetic of the lanes
    kernels (row offsets are 64-bit in every kernel). A time-major view, (B, L, D) read as
    (B, D, L), has stride D along L: at D = 2560 it overflows past L = 838,860."""
    return t is None or (t.shape[-1] - 1) * abs(t.stride(-1)) < 2**31


def _overlaps(out, *inputs) -> bool:
    """Whether `out` shares memory with any of the inputs (a conservative test: same storage)."""
    ptr = out.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs)


def _time_safe(t):
    """t, or a contiguous copy of it where its time offsets would overflow (`_time_offsets_fit`):
    a rare case that costs one copy, never a wrong answer."""
    return t if _time_offsets_fit(t) else t.contiguous()


def _bc_operands(B, C):
    """B and C as the kernels read them: through one shared set of strides (so slices of one
    x_proj output, with equal strides, need no copy); otherwise both made contiguous."""
    if B.stride() == C.stride() and _time_offsets_fit(B):
        return B, C
    return B.contiguous(), C.contiguous()


class _Launch:
    """Shapes, strides, block sizes and grids shared by the forward and backward launches.

    Everything here depends only on the inputs' shapes, dtypes and B/C strides (and the
    MAMBAKIT_SCAN_* settings), so dense inputs take it from a cache (`_plan`): at (16, 512) a
    forward+backward is bound by host time, and working this out again cost ~100 µs a call."""

    def __init__(self, u, B, A, cu_seqlens, block_l, block_d=None):
        self.layout = layout = kernel_layout()
        self.batch, self.dim, self.L = u.shape
        self.d_state = A.shape[1]
        self.groups = B.shape[1] if B.ndim == 4 else 1
        self.cpg = self.dim // self.groups
        self.varlen = cu_seqlens is not None
        self.n_seqs = cu_seqlens.numel() - 1 if self.varlen else self.batch
        self.elem_size = B.element_size()
        self.BLOCK_N = max(next_power_of_2(self.d_state), 2)
        if layout == "by_state":  # 2-D (BLOCK_D, BLOCK_L) tiles: long chunks, few channels
            self.BLOCK_D = block_d or _block_d(self.cpg, 64)
            self.BLOCK_L = block_l or 256
        elif layout == "lanes":  # BLOCK_L is the interval at which the forward saves states
            from .selective_scan_lanes import save_interval
            self.BLOCK_D = block_d or _block_d(self.cpg, self.d_state)
            self.BLOCK_L = block_l or save_interval(u.dtype)
        else:
            self.BLOCK_D = block_d or _block_d(self.cpg, self.d_state)
            self.BLOCK_L = block_l or max(2, min(64, 8192 // (self.BLOCK_D * self.BLOCK_N)))
        self.BLOCK_L = min(self.BLOCK_L, max(2, next_power_of_2(self.L)))
        # the saved states: bf16 for bf16 inputs in the lanes layout (see save_interval), else fp32
        self.states_dtype = torch.bfloat16 if layout == "lanes" and u.dtype == torch.bfloat16 else torch.float32
        # sized from L, not from the longest packed sequence, so that shapes never depend on
        # data (torch.compile's fake tensors) and no host sync is needed
        self.n_chunks = cdiv(self.L, self.BLOCK_L)
        # saved chunk-start states: n_chunks per dense sequence; packed sequences end to end,
        # at most cdiv(L, BLOCK_L) + S chunks in all
        self.state_rows = self.n_chunks + self.n_seqs if self.varlen else self.n_seqs * self.n_chunks
        self.n_dblocks = cdiv(self.dim, self.BLOCK_D)
        self.grid = (self.n_seqs, self.n_dblocks)
        Bv = B if B.ndim == 4 else B.unsqueeze(1)  # (b, G, N, L)
        self.bc_strides = (Bv.stride(0), Bv.stride(1), Bv.stride(2), Bv.stride(3))
        # B and C rows do not load as aligned 16-byte vectors along time: packed sequences
        # start anywhere, and a time stride other than 1 is no vector at all (t_in_thread)
        self.unaligned = self.varlen or self.bc_strides[3] != 1
        self._fwd = [None, None]  # the forward's shape, [causal, reversed]
        self._bwd = None

    def chunk_base(self, cu_seqlens):
        """Packed sequences: where each sequence's saved states start (exclusive sums of its
        chunk counts, on the device); None for a dense batch."""
        if cu_seqlens is None:
            return None
        counts = (cu_seqlens[1:] - cu_seqlens[:-1] + self.BLOCK_L - 1) // self.BLOCK_L
        return torch.cumsum(counts, 0) - counts

    def fwd_shape(self, num_warps=4, lanes=None, reverse=False):
        """(grid, kernel shape kwargs, seg_len, n_segs) of the forward; `reverse`: of the reversed
        scan (no segments: the caller flips instead where the forward would cut them)."""
        if lanes is None and num_warps == 4:
            if self._fwd[reverse] is None:
                self._fwd[reverse] = self._forward_shape(num_warps, None, reverse)
            return self._fwd[reverse]
        return self._forward_shape(num_warps, lanes, reverse)

    def _forward_shape(self, num_warps, lanes, reverse):
        grid, shape, seg_len, n_segs = self._shape(False, num_warps, lanes)
        if reverse:
            # a reversed chunk's carried state is read from a flipped tile. The sm_90 build read
            # the wrong step from it where a thread does not hold all of its states (NL x
            # BLOCK_D short of the warp's lanes; session 11, fp32) and where one lane holds all
            # of a channel's states (NL = 1: d_state 4, bf16, errors of 3.8-9.2 against the
            # reference at 4 x 64 x 64 and 24 x 384 x 64, right with the masked sum; session 13,
            # benchmarks/.diag13.py), so the masked sum reads it there instead
            ordered = (shape["ORDERED"] and shape["NL"] > 1
                       and shape["NL"] * shape["BLOCK_D"] >= 32 * shape["num_warps"])
            shape = {**shape, "REVERSE": True, "ORDERED": ordered}
        return grid, shape, seg_len, n_segs

    def bwd_shape(self, num_warps=None, lanes=None):
        """(grid, kernel shape kwargs, seg_len, n_segs) of the backward."""
        if lanes is None and num_warps is None:
            if self._bwd is None:
                self._bwd = self._shape(True, 2 if self.layout == "lanes" else 4, None)
            return self._bwd
        return self._shape(True, num_warps or (2 if self.layout == "lanes" else 4), lanes)

    def _shape(self, backward, num_warps, lanes):
        grid, shape, seg_len, n_segs = self.grid, dict(BLOCK_D=self.BLOCK_D, num_warps=num_warps), 0, 1
        if self.layout == "lanes":  # its own channel blocks; BLOCK_L stays the save interval
            from .selective_scan_lanes import lanes_bwd_shape, lanes_shape
            from .selective_scan_segments import segment_plan
            seg_len, n_segs = segment_plan(self.n_seqs * self.dim, self.L, self.varlen, self.BLOCK_L)
            rows = self.n_seqs * n_segs * self.dim
            if backward:
                shape = lanes_bwd_shape(self.BLOCK_N, self.cpg, self.BLOCK_L, self.elem_size, self.L,
                                        self.unaligned, rows)
            else:
                shape = lanes_shape(self.BLOCK_N, self.cpg, self.elem_size, self.BLOCK_L, rows, self.L,
                                    self.unaligned)
            self._override(shape, lanes)
            if not backward and "EVEN" not in (lanes or {}):
                # every chunk, channel block and state in bounds: the forward drops its masks
                shape["EVEN"] = (not self.varlen and self.L % shape["T"] == 0 and self.d_state == self.BLOCK_N
                                 and self.dim % shape["BLOCK_D"] == 0)
            grid = (self.n_seqs * n_segs, cdiv(self.dim, shape["BLOCK_D"]))
        return grid, shape, seg_len, n_segs

    def _override(self, shape, lanes):
        """A tuning sweep's override of the lanes kernels' shape; whether T stays within a
        thread is worked out again for the new shape."""
        if lanes:
            from .selective_scan_lanes import t_in_thread
            shape.update(lanes)
            if "ORDERED" not in lanes:
                shape["ORDERED"] = t_in_thread(shape["T"], self.elem_size, self.BLOCK_N, shape["BLOCK_D"],
                                               shape["num_warps"], self.L, self.unaligned)


_PLANS: dict = {}


def clear_plans() -> None:
    """Forget the cached launch plans. A plan reads MAMBAKIT_SCAN_KERNEL and the segment
    settings (MAMBAKIT_SCAN_SEG_*) when it is first made for a shape; call this after changing
    them within a process. MAMBAKIT_SCAN_SAVE_EVERY, _BWD_CHUNKS and _BWD_BLOCK_D are read
    once, at import."""
    _PLANS.clear()


def _plan(u, B, A, cu_seqlens, block_l=None, block_d=None) -> _Launch:
    """The launch plan for these inputs: cached for dense inputs at the default block sizes."""
    if cu_seqlens is not None or block_l is not None or block_d is not None:
        return _Launch(u, B, A, cu_seqlens, block_l, block_d)
    key = (u.shape, u.dtype, B.shape, B.stride(), B.dtype, A.shape)
    lc = _PLANS.get(key)
    if lc is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        lc = _PLANS[key] = _Launch(u, B, A, None, None, None)
    return lc


def dbc_dtype(B, C) -> torch.dtype:
    """The dtype in which scan_bwd returns dB and dC: theirs when they share one (one rounding of
    the fp32 sums, in the same launch for both), else fp32."""
    return B.dtype if B.dtype == C.dtype else torch.float32


# MAMBAKIT_REVERSE_WORDS=0 (read once, at import): the reversed scan without the words prefetch (a sweep's A/B)
_REVERSE_WORDS = os.environ.get("MAMBAKIT_REVERSE_WORDS", "1") == "1"


def _bc_words_fit(B, C, shape: dict, align: int = 4) -> bool:
    """Whether the lanes forward can load B and C as 32-bit words of two bf16 time steps (PREFETCH
    2): bf16 rows with unit stride along time, every chunk in bounds (EVEN) and of an even
    number of steps, and every row start `align`-byte aligned."""
    return (shape.get("EVEN", False) and shape["T"] % 2 == 0
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.data_ptr() % align == 0
                    and all(2 * st % align == 0 for st in t.stride()[:-1]) for t in (B, C)))


def _summary_shape(shape: dict) -> dict:
    """The forward kernel's shape for its segment summary kernel, which has no register prefetch."""
    return {k: v for k, v in shape.items() if k not in ("PREFETCH", "EVEN", "REVERSE")}


def _contig(t):
    return None if t is None else t.contiguous()


def _strides(t):
    return (0, 0, 0) if t is None else t.stride()


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, cu_seqlens, save_states,
             block_l=None, block_d=None, num_warps=4, lanes=None, out=None, reverse=False, add=None,
             out_scale=1.0, fixed_bc_stride=False):
    """Returns out (b, D, L) in u's dtype, final_state (S, D, N) fp32, chunk_states or None.
    `out`: a (b, D, L) tensor of u's dtype to write the output into, which may be u itself (the
    lanes kernels read each chunk of u before they write the same chunk of the output, and each
    program owns its rows); written through a fresh tensor where that is not so.
    `reverse`: scan from step L-1 down to 0 (the lanes kernel only; dense inputs, no saved
    states: an inference path); final_state is then the state after step 0.
    `add` (b, D, L) and `out_scale` (the lanes kernel only): out = out_scale * (y + D u + add) *
    SiLU(z); `add` may be `out` itself (Vision Mamba adds its two directions this way).
    `fixed_bc_stride`: compile B and C's stride between states into the kernel (fewer address
    instructions; one compilation per stride, so only for a layout that stays fixed)."""
    extras = add is not None or out_scale != 1.0 or fixed_bc_stride
    if (reverse or extras) and kernel_layout() != "lanes":
        raise ValueError("reverse, add, out_scale and fixed_bc_stride take the lanes kernel "
                         f"(MAMBAKIT_SCAN_KERNEL={kernel_layout()!r})")
    if add is not None and add.shape != u.shape:
        raise ValueError(f"scan_fwd: add has shape {tuple(add.shape)}, the output {tuple(u.shape)}")
    if reverse:
        if cu_seqlens is not None or save_states:
            raise ValueError("a reversed scan takes dense inputs and saves no states "
                             f"(cu_seqlens={cu_seqlens is not None}, save_states={save_states})")
        if _segmented(u):
            return _reverse_by_flipping(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                        block_l, block_d, num_warps, lanes, out, add, out_scale)
    if out is not None and not (_time_offsets_fit(out) and (kernel_layout() == "lanes"
                                                             or not _overlaps(out, u, delta, z))):
        y, final, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                    cu_seqlens, save_states, block_l, block_d, num_warps, lanes, reverse=reverse,
                                    add=add, out_scale=out_scale, fixed_bc_stride=fixed_bc_stride)
        return out.copy_(y), final, states
    A, D, delta_bias = map(_contig, (A, D, delta_bias))  # u, delta, z are read through their strides
    u, delta, z = _time_safe(u), _time_safe(delta), _time_safe(z)
    B, C = _bc_operands(B, C)
    init = None if initial_state is None else initial_state.float().contiguous()
    lc = _plan(u, B, A, cu_seqlens, block_l, block_d)
    if out is None:
        out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if add is not None and add.stride() != out.stride():  # the kernel reads add through out's strides
        add = torch.empty_strided(out.shape, out.stride(), dtype=add.dtype, device=add.device).copy_(add)
    final = torch.empty(lc.n_seqs, lc.dim, lc.d_state, device=u.device, dtype=torch.float32)
    states = (torch.empty(lc.state_rows, lc.dim, lc.d_state, device=u.device, dtype=lc.states_dtype)
              if save_states else None)
    dummy = final
    grid, shape, seg_len, n_segs = lc.fwd_shape(num_warps, lanes, reverse)
    segs = {}
    if seg_len:  # pass 1: every segment's local final state and Σ Δ
        from .selective_scan_segments import _fwd_summary_lanes
        seg_h = torch.empty(grid[0], lc.dim, lc.d_state, device=u.device, dtype=torch.float32)
        seg_dt = torch.empty(grid[0], lc.dim, device=u.device, dtype=torch.float32)
        launch(_fwd_summary_lanes, grid, [
            u, delta, A, B, delta_bias if delta_bias is not None else dummy, seg_h, seg_dt,
            lc.L, lc.dim, lc.d_state, lc.cpg, n_segs, seg_len, *u.stride(), *delta.stride(), *lc.bc_strides],
            dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), BLOCK_N=lc.BLOCK_N,
                 **_summary_shape(shape)))
        segs = dict(seg_h_ptr=seg_h, seg_dt_ptr=seg_dt, n_segs=n_segs, seg_len=seg_len, SEGMENTED=True)
    if (reverse or fixed_bc_stride) and "PREFETCH" not in (lanes or {}):
        # Vim's padded path: each chunk's loads issued a chunk ahead (Vim-Ti at 1024 px, batch 64:
        # forward 0.841 -> 0.779 ms, reversed 0.993 -> 0.871; results/tune_vim_h200.jsonl), B and
        # C as 32-bit words of two bf16 steps where their rows allow it (PREFETCH 2). It compiles
        # to about 167 registers offline; uncapped, the whole model took 95.0 against 66.4 ms, as
        # past 168 registers an SM holds 11 one-warp programs instead of 12 and Vim-Ti's 1,536 at
        # 1024 px no longer fit one wave; capped at 168, 64.9 ms with the same features. The
        # reversed scan takes the words only where the rows are 16-byte aligned: right on sm_90
        # there (session 13's diagnostic), wrong where they are only 4-byte aligned (session 12)
        if _bc_words_fit(B, C, shape, 16 if reverse else 4) and (_REVERSE_WORDS or not reverse):
            shape = {**shape, "PREFETCH": 2, "maxnreg": 168}
        else:
            shape = {**shape, "PREFETCH": 1}
    if extras:
        segs.update(add_ptr=add if add is not None else dummy, OUT_SCALE=float(out_scale), HAS_ADD=add is not None,
                    BN_STRIDE=lc.bc_strides[2] if fixed_bc_stride else 0)
    chunk_base = lc.chunk_base(cu_seqlens)
    launch(_kernels(lc.layout)[0], grid, [
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, init if init is not None else dummy,
        cu_seqlens if cu_seqlens is not None else dummy, out, final, states if states is not None else dummy,
        chunk_base if chunk_base is not None else dummy,
        lc.L, lc.dim, lc.d_state, lc.cpg,
        *u.stride(), *delta.stride(), *_strides(z), *lc.bc_strides, *out.stride(), lc.n_chunks,
    ], dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_INIT=init is not None,
            SOFTPLUS=bool(delta_softplus), VARLEN=lc.varlen, SAVE_STATES=bool(save_states),
            BLOCK_N=lc.BLOCK_N, BLOCK_L=lc.BLOCK_L, **shape, **segs))
    return out, final, states


def _segmented(u) -> bool:
    """Whether a dense forward scan of u's shape is cut into segments (few rows, long sequences)."""
    from .selective_scan_lanes import save_interval
    from .selective_scan_segments import segment_plan
    batch, dim, length = u.shape
    return segment_plan(batch * dim, length, False, save_interval(u.dtype))[0] > 0


def _reverse_by_flipping(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, block_l, block_d,
                         num_warps, lanes, out, add=None, out_scale=1.0):
    """The reversed scan as the forward scan of the time-flipped inputs, flipped back: where the
    forward cuts its few rows into segments scanned in parallel (the reversed kernel has no
    segments, so one warp would walk each whole row: 1.55 against 0.49 ms at 2 x 1536 x 8192).
    The flips copy u, Δ, z, B, C and y once each, which at so few rows costs little."""
    flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
    y, final, _ = scan_fwd(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, initial_state,
                           delta_softplus, None, False, block_l, block_d, num_warps, lanes, add=flip(add),
                           out_scale=out_scale)
    y = y.flip(-1)
    return (y if out is None else out.copy_(y)), final, None


def _grad_buffers(u, delta, z, grads_out):
    """du, ddelta, dz (B, D, L), in the dtypes of u, delta and z, which the kernel writes
    through one set of strides: contiguous, or du and dz are `grads_out`'s tensors (ddelta
    then gets their strides) when those share strides and dtypes fit."""
    if grads_out is not None:
        du, dz = grads_out
        fits = (du.shape == u.shape and du.dtype == u.dtype and _time_offsets_fit(du)
                and (z is None if dz is None else (dz.shape == u.shape and dz.dtype == z.dtype
                                                   and dz.stride() == du.stride())))
        if fits:
            return du, torch.empty_strided(u.shape, du.stride(), device=u.device, dtype=delta.dtype), dz
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)  # (B, D, L), contiguous
    ddelta = torch.empty(u.shape, device=u.device, dtype=delta.dtype)
    dz = torch.empty(u.shape, device=u.device, dtype=z.dtype) if z is not None else None
    return du, ddelta, dz


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, delta_softplus, chunk_states, dout, dfinal,
             block_l=None, block_d=None, num_warps=None, lanes=None, grads_out=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit): du, ddelta and dz in the
    dtypes of u, delta and z (the kernel accumulates in fp32 and rounds once on the store); dB
    and dC in B's dtype; the rest in fp32. grads_out: (du, dz or None), (B, D, L) tensors with
    one set of strides, for the kernel to write du and dz into (slices of one buffer laid out as
    the caller's gradient must be, for example); where they do not fit (`_grad_buffers`), du
    and dz are fresh and the caller must check what came back."""
    A, D, delta_bias = map(_contig, (A, D, delta_bias))  # u, delta, z, dout: read through their strides
    u, delta, z, dout = _time_safe(u), _time_safe(delta), _time_safe(z), _time_safe(dout)
    B, C = _bc_operands(B, C)
    lc = _plan(u, B, A, cu_seqlens, block_l, block_d)
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta, dz = _grad_buffers(u, delta, z, grads_out)
    dinit = torch.empty(lc.n_seqs, lc.dim, lc.d_state, **f32)
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    grid, shape, seg_len, n_segs = lc.bwd_shape(num_warps, lanes)
    segs = {}
    if seg_len:  # pass 1: the adjoint out of every segment's start (from zero) and Σ Δ
        from .selective_scan_segments import _bwd_summary_lanes
        seg_g = torch.empty(grid[0], lc.dim, lc.d_state, **f32)
        seg_dt = torch.empty(grid[0], lc.dim, **f32)
        launch(_bwd_summary_lanes, grid, [
            delta, A, C, z if z is not None else seg_g, delta_bias if delta_bias is not None else seg_g, dout,
            seg_g, seg_dt, lc.L, lc.dim, lc.d_state, lc.cpg, n_segs, seg_len,
            *delta.stride(), *_strides(z), *dout.stride(), *lc.bc_strides],
            dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                 BLOCK_N=lc.BLOCK_N, **shape))
        segs = dict(seg_g_ptr=seg_g, seg_dt_ptr=seg_dt, n_segs=n_segs, seg_len=seg_len, SEGMENTED=True)
    n_dblocks, rows = grid[1], grid[0]
    # per-program partial sums, reduced below in a fixed order (deterministic): over time, one
    # row per program span (sequence or segment) of [dA (D, N) | dD (D) | dΔ-bias (D)]; over
    # channels, dB and dC per channel block. The lanes kernel writes every (row, n, t) of a
    # dense batch; packed sequences and the other layouts may leave entries unwritten, which
    # must then read as zero.
    sums_part = torch.empty(rows, lc.dim * (lc.d_state + 2), **f32)
    alloc = torch.empty if lc.layout == "lanes" and not lc.varlen else torch.zeros
    dBC_part = alloc(2, lc.batch, n_dblocks, lc.d_state, lc.L, **f32)  # dB, dC
    dummy = dinit
    chunk_base = lc.chunk_base(cu_seqlens)
    launch(_kernels(lc.layout)[1], grid, [
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, cu_seqlens if cu_seqlens is not None else dummy,
        chunk_states, chunk_base if chunk_base is not None else dummy, dout, dfinal if dfinal is not None else dummy,
        du, ddelta, dz if dz is not None else dummy, dinit, sums_part, dBC_part[0], dBC_part[1],
        lc.L, lc.dim, lc.d_state, lc.cpg, n_dblocks,
        *u.stride(), *delta.stride(), *_strides(z), *dout.stride(), *du.stride(), *lc.bc_strides, lc.n_chunks,
    ], dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DFINAL=dfinal is not None,
            SOFTPLUS=bool(delta_softplus), VARLEN=lc.varlen, BLOCK_N=lc.BLOCK_N, BLOCK_L=lc.BLOCK_L, **shape, **segs))
    blocks_per_group = lc.cpg // shape["BLOCK_D"]
    if B.ndim == 3:  # (2, b, blocks, N, L) -> (2, b, N, L)
        dBC = dBC_part.view(2, lc.batch, blocks_per_group, lc.d_state, lc.L).sum(2)
    else:  # (2, b, G, blocks per group, N, L) -> (2, b, G, N, L)
        dBC = dBC_part.view(2, lc.batch, lc.groups, blocks_per_group, lc.d_state, lc.L).sum(3)
    dB, dC = dBC.to(dbc_dtype(B, C)).unbind(0)
    dA, dD, dbias = sums_part.sum(0).split_with_sizes([lc.dim * lc.d_state, lc.dim, lc.dim])
    return (du, ddelta, dA.view(lc.dim, lc.d_state), dB, dC, dD if D is not None else None, dz,
            dbias if delta_bias is not None else None, dinit)
