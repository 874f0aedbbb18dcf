"""The jit helpers that more than one kernel module calls, with public names.

Two groups:
- element-wise math on the special-function unit and a few index helpers, used by the scan,
  the decoding step, the x_proj/Δ kernel and the bidirectional conv: `combine`, `fast_log2`,
  `widen`, `silu`, `softplus`, `seq_bounds`, `chunk_row`; and for the SSD's kernels
  `tiles_last` (a 1-D grid's item and tile) and `chunk_group` (the state passing's load of a
  group of chunks, forward and backward);
- the building blocks of the "lanes" register tile of the selective scan, used by its main
  kernels (scan_kernels.py) and by its segment summaries (scan_segments.py): loads of a chunk,
  the chunk's math, its in-register scans, and what a program owns (`lanes_setup`).

The lanes tile is (NL, BLOCK_D, T, NR): state n = n1 * NR + n2 with n1 over NL lanes and n2 in
registers, BLOCK_D channels over the remaining lanes and the warps, and T consecutive time steps
of one channel in registers. Per-(channel, step) values live on a compact 2-D (BLOCK_D, T) tile.
Helpers used by one kernel module only stay in that module."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---- element-wise math and indices ----------------------------------------------------------

@triton.jit
def combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def fast_log2(x, FAST: tl.constexpr):
    """log2 on the special-function unit (one MUFU.LG2) when compiled; tl.log2 (a polynomial of
    a dozen FMAs) in the interpreter, which has no inline assembly."""
    if FAST:  # flush-to-zero: the callers' arguments are at least 1, never subnormal
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def widen(x, FAST: tl.constexpr):
    """x in fp32. With FAST, a bf16 tile is widened two values a 32-bit register, by one shift and
    one mask (a bf16 is the top half of the fp32 it rounds): Triton's conversion spends a PRMT and
    a shift on each high half (192 against 128 instructions for B and C a chunk in the lanes
    scan's sm_90 SASS, benchmarks/tuning/scan_sass.py). The interpreter, which has no inline assembly,
    and other dtypes convert as usual."""
    if FAST and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16;\n and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def silu(x, FAST: tl.constexpr):
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
def softplus(x, FAST: tl.constexpr):
    """log(1 + e^x) as ln2 * log2(1 + 2^(x log2 e)): two special-function operations with FAST.
    Below x = -4 it is the series e - e^2/2 + e^3/3 of log1p(e) instead (relative error < e^3/4
    < 2e-6): in fp32, 1 + e rounds away e's low bits, which quantized small steps Δ in units of
    about 1e-7, while a state that must hold over 2^20 steps needs Δ of that order to be exact."""
    e = tl.exp2(x * 1.4426950408889634)
    series = e * (1.0 - e * (0.5 - e * 0.3333333333333333))
    return tl.where(x > 20.0, x, tl.where(x < -4.0, series, 0.6931471805599453 * fast_log2(1.0 + e, FAST)))


@triton.jit
def seq_bounds(cu_seqlens_ptr, pid_s, L, VARLEN: tl.constexpr):
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
def chunk_row(chunk_base_ptr, pid_s, n_chunks_max, chunk, VARLEN: tl.constexpr):
    """Row of the saved chunk-start states: dense sequences have n_chunks_max rows each; packed
    ones are laid end to end from their offsets (exclusive sums of their chunk counts)."""
    if VARLEN:
        base = tl.load(chunk_base_ptr + pid_s).to(tl.int64)
    else:
        base = pid_s.to(tl.int64) * n_chunks_max
    return base + chunk


# ---- the SSD's state passing (ssd_fwd_kernels.py, ssd_bwd_kernels.py) ----------------------

@triton.jit
def tiles_last(n_a, n_b):
    """(item, a, b) of a program of a 1-D grid laid out as items x n_a x n_b, b fastest: the
    programs launched next to one another are the tiles of one item (a chunk of one head or
    group), which then find each other's loads in L2 (the SSD's chunk kernels)."""
    pid = tl.program_id(0)
    return pid // (n_a * n_b), (pid // n_b) % n_a, pid % n_b


@triton.jit
def chunk_group(slots, totals, chunk, ok, n_chunks, chunk_stride, T):
    """The (GROUP, BLOCK) tiles of the chunks `chunk` from `slots`, and their (GROUP,) log decays
    from `totals`; chunks outside [0, n_chunks) load 0 (no contribution, and a decay of exp(0) = 1)."""
    inside = (chunk >= 0) & (chunk < n_chunks)
    tile = tl.load(slots + chunk[:, None] * chunk_stride, mask=inside[:, None] & ok[None, :], other=0.0)
    return tile, tl.load(totals + chunk * T, mask=inside, other=0.0)


# ---- the lanes tile of the selective scan ---------------------------------------------------

@triton.jit
def _last(a, b):
    return b


@triton.jit
def _first(a, b):
    return a


@triton.jit
def at_step(x, t4, step: tl.constexpr, ORDERED: tl.constexpr):
    """x at one time step of the chunk, keeping the axis: (NL, BLOCK_D, 1, NR). With T within each
    thread (ORDERED) a reduction that keeps its first or last operand is a register move; when the
    launcher cannot promise that layout (unaligned rows, packed sequences), T may span lanes,
    where Triton's reductions assume a commutative operation, so a masked sum is used instead."""
    if ORDERED:
        if step == 0:
            return tl.reduce(x, 2, _first, keep_dims=True)
        else:
            return tl.reduce(x, 2, _last, keep_dims=True)
    else:
        return tl.sum(tl.where(t4 == step, x, 0.0), axis=2, keep_dims=True)


@triton.jit
def load_steps(row, tt, stride, mask, end, EVEN: tl.constexpr):
    """row + tt * stride in its own dtype: steps at or past `end` (and lanes outside `mask`) read
    as 0 and touch no memory, unless EVEN (the launcher's promise that nothing is out of bounds)."""
    if EVEN:
        return tl.load(row + tt * stride)
    else:
        return tl.load(row + tt * stride, mask=mask & (tt < end), other=0.0)


@triton.jit
def step_loads(u_row, dt_row, t0, end, t2, mask_d2, s_ul, s_dl, EVEN: tl.constexpr = False):
    """One chunk's per-(channel, step) raw inputs u, dt_raw (BLOCK_D, T)."""
    return (load_steps(u_row, t0 + t2, s_ul, mask_d2, end, EVEN),
            load_steps(dt_row, t0 + t2, s_dl, mask_d2, end, EVEN))


@triton.jit
def state_loads(B_row, C_row, t0, end, t4, mask_n4, s_bl, EVEN: tl.constexpr = False):
    """One chunk's B, C (NL, BLOCK_D, T, NR)."""
    return (load_steps(B_row, t0 + t4, s_bl, mask_n4, end, EVEN),
            load_steps(C_row, t0 + t4, s_bl, mask_n4, end, EVEN))


@triton.jit
def chunk_loads(u_row, dt_row, B_row, C_row, t0, end, t2, t4, mask_d2, mask_n4, s_ul, s_dl, s_bl,
                 EVEN: tl.constexpr = False):
    """One chunk's raw inputs, in their own dtypes: u, dt_raw (BLOCK_D, T); B, C (NL, BLOCK_D, T, NR).
    Steps at or past `end` read as 0 and touch no memory. EVEN: every chunk, channel and state is
    in bounds (the launcher's promise), so nothing is masked."""
    u, dt_raw = step_loads(u_row, dt_row, t0, end, t2, mask_d2, s_ul, s_dl, EVEN)
    Bt, Ct = state_loads(B_row, C_row, t0, end, t4, mask_n4, s_bl, EVEN)
    return u, dt_raw, Bt, Ct


@triton.jit
def chunk_math(u, dt_raw, Bt, Ct, m2, bias, A2, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                FAST: tl.constexpr, EVEN: tl.constexpr = False):
    """From one chunk's raw inputs: u, dt_raw, dt (BLOCK_D, T) and B, C, exp(ΔA), ΔBu (NL, BLOCK_D,
    T, NR), in fp32. Masked steps (m2 false) have Δ = 0, so exp(ΔA) = 1 and ΔBu = 0 pass the
    state through."""
    u = u.to(tl.float32)
    dt_raw = dt_raw.to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias
    dt = softplus(dt_raw, FAST) if SOFTPLUS else dt_raw
    if not EVEN:
        dt = tl.where(m2, dt, 0.0)
    Bt = widen(Bt, FAST)
    Ct = widen(Ct, FAST)
    # Δ and u are broadcast before their product: formed on the compact tile, Δu would keep Δ
    # there as well, and Triton then computed the softplus in both tiles' layouts (24 against
    # 16 MUFU a chunk in the sm_90 SASS, benchmarks/tuning/scan_sass.py)
    dt4 = dt[None, :, :, None]
    dA = tl.exp2(dt4 * A2)
    dBu = (dt4 * u[None, :, :, None]) * Bt
    return u, dt_raw, dt, Bt, Ct, dA, dBu


@triton.jit
def chunk_inputs(u_row, dt_row, B_row, C_row, bias, A2, t0, end, t2, t4, mask_d2, mask_n4, s_ul, s_dl, s_bl,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """One chunk's inputs, loaded and prepared (`chunk_loads`, `chunk_math`): m2 and the fp32
    u, dt_raw, dt, B, C, exp(ΔA), ΔBu."""
    u, dt_raw, Bt, Ct = chunk_loads(u_row, dt_row, B_row, C_row, t0, end, t2, t4, mask_d2, mask_n4, s_ul, s_dl,
                                     s_bl)
    m2 = mask_d2 & (t0 + t2 < end)
    u, dt_raw, dt, Bt, Ct, dA, dBu = chunk_math(u, dt_raw, Bt, Ct, m2, bias, A2, HAS_BIAS, SOFTPLUS, FAST)
    return m2, u, dt_raw, dt, Bt, Ct, dA, dBu


@triton.jit
def reverse_scan(a, b, axis: tl.constexpr):
    """r_t = b_t + a_t r_{t+1} along `axis`. Triton's associative_scan(reverse=True) emits warp
    shuffles even when the axis lies within each thread (320 SHFL for a (4, 8, 8, 4) tile, seen
    in the sm_90 SASS); flipping the axis (register renames here) around a forward scan does not."""
    _, r = tl.associative_scan((tl.flip(a, axis), tl.flip(b, axis)), axis, combine)
    return tl.flip(r, axis)


@triton.jit
def chunk_states(dA, dBu, h, t4):
    """The states after each step of a chunk, from the state h before it: an in-register scan."""
    dBu = tl.where(t4 == 0, dBu + dA * h, dBu)  # fold the carried state into the first step
    _, hs = tl.associative_scan((dA, dBu), 2, combine)
    return hs


@triton.jit
def program_span(cu_seqlens_ptr, L, n_segs, seg_len, VARLEN: tl.constexpr, SEGMENTED: tl.constexpr):
    """The time span [start, end) that this program scans: a whole sequence, or if SEGMENTED
    one segment of a dense sequence (program row = sequence * n_segs + segment). Returns also
    the sequence (its row in the initial/final states) and the segment index."""
    pid = tl.program_id(0)
    if SEGMENTED:
        seq = pid // n_segs
        seg = pid % n_segs
        start = seg * seg_len  # seg_len is a multiple of 64: Triton sees start's alignment
        end = tl.minimum(start + seg_len, L)
        batch = seq
    else:
        batch, start, end = seq_bounds(cu_seqlens_ptr, pid, L, VARLEN)
        seq = pid
        seg = pid * 0
    return pid, seq, seg, batch, start, end


@triton.jit
def lanes_setup(cu_seqlens_ptr, A_ptr, bias_ptr, D_ptr, u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, L, dim, d_state,
                 channels_per_group, s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_bb, s_bg, s_bn, n_segs, seg_len,
                 HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, VARLEN: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, NL: tl.constexpr,
                 SEGMENTED: tl.constexpr):
    """What a program owns (its span [start, end) of one sequence and BLOCK_D channels), its
    indices in the 4-D (NL, BLOCK_D, T, NR) and 2-D (BLOCK_D, T) tiles, and the row pointers of
    its inputs."""
    NR: tl.constexpr = BLOCK_N // NL
    pid_s, seq, seg, batch, start, end = program_span(cu_seqlens_ptr, L, n_segs, seg_len, VARLEN, SEGMENTED)
    pid_d = tl.program_id(1)
    n4 = tl.arange(0, NL)[:, None, None, None] * NR + tl.arange(0, NR)[None, None, None, :]
    d4 = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :, None, None]
    t4 = tl.arange(0, T)[None, None, :, None]
    d2 = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    t2 = tl.arange(0, T)[None, :]
    mask_n4 = n4 < d_state
    m_dn4 = (d4 < dim) & mask_n4
    mask_d2 = d2 < dim
    dn4 = d4 * d_state + n4  # (NL, BLOCK_D, 1, NR) into a (.., D, N) state
    A2 = tl.load(A_ptr + dn4, mask=m_dn4, other=0.0).to(tl.float32) * 1.4426950408889634  # for exp2
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d2, mask=mask_d2, other=0.0).to(tl.float32)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + d2, mask=mask_d2, other=0.0).to(tl.float32)
    b64 = batch.to(tl.int64)
    d64 = d2.to(tl.int64)
    u_row = u_ptr + b64 * s_ub + d64 * s_ud  # (BLOCK_D, 1)
    dt_row = delta_ptr + b64 * s_db + d64 * s_dd
    z_row = z_ptr + b64 * s_zb + d64 * s_zd
    group = (pid_d * BLOCK_D) // channels_per_group  # BLOCK_D divides channels_per_group
    row_bc = b64 * s_bb + group * s_bg
    # + 0 * d4: B and C are loaded as full 4-D tiles, which fixes the register layout (above)
    B_row = B_ptr + row_bc + n4 * s_bn + 0 * d4  # (NL, BLOCK_D, 1, NR)
    C_row = C_ptr + row_bc + n4 * s_bn + 0 * d4
    state_row = seq.to(tl.int64) * dim * d_state
    return (pid_s, seq, seg, pid_d, batch, start, end, n4, d4, t4, d2, t2, mask_n4, m_dn4, mask_d2, dn4, A2, bias,
            Dv, u_row, dt_row, z_row, B_row, C_row, state_row)
