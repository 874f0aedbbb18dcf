"""The selective scan's launch plan: every block size, flag and grid of its kernels, worked out
at once from the inputs' shapes, dtypes and B/C strides (and the tuning knobs).

`plan_scan(u, B, A, cu_seqlens)` returns a `ScanPlan` with the forward, the reversed forward
(Vision's backward direction) and the backward launches, each with its segments' summary
launch where a long sequence in a small batch is cut into segments. Dense plans are cached
(a forward+backward at (16, 512) is bound by host time, and working this out again cost about
100 µs a call); the cache is cleared when the knobs change (`knobs.override`).

The defaults below come from the H200 sweeps of benchmarks/tuning/ (BENCHMARKS.md, "Tuning
scripts"); `lanes=` overrides any kernel meta-parameter for such a sweep."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import knobs
from ..backend import interpreting
from .host import cdiv, next_power_of_2


# ---- the pieces of a plan, each from a sweep ---------------------------------------------------

def save_interval(dtype: torch.dtype) -> int:
    """Steps between the states that the forward saves for the backward. From the H200 sweep
    (benchmarks/tuning/tune_save_interval.py): saving every 8 steps lets the backward take each
    8-step chunk back from a saved state, where every 16 costs a recompute of the first chunk:
    the backward runs 11 % faster. For bf16 inputs the saved states are bf16, which keeps their
    memory at that of fp32 states every 16 steps; the error this adds to the recomputed states
    (2^-9 relative, restarting every 8 steps) is that of rounding the bf16 inputs themselves.
    fp16 inputs keep fp32 states (fp16 overflows where long sums of ΔBu do not), and so does
    fp32, every 16. Knob: scan_save_every."""
    forced = knobs.current().scan_save_every
    if forced is not None:
        return forced
    return 8 if dtype == torch.bfloat16 else 16


def lanes_blocks(d_state_block: int, states_per_thread: int, channels_per_group: int) -> tuple[int, int]:
    """(NL lanes over states, channels per one-warp program): the other 32 / NL lanes take
    channels, halved until they divide the group (one program reads one group's B and C)."""
    NL = min(32, max(1, d_state_block // states_per_thread))
    block_d = 32 // NL
    while block_d > 1 and channels_per_group % block_d:
        block_d //= 2
    return NL, block_d


def t_in_thread(T: int, elem_size: int, d_state_block: int, block_d: int, num_warps: int, length: int,
                unaligned: bool) -> bool:
    """Whether Triton will keep a chunk's T steps within each thread: B and C rows load as
    aligned 16-byte vectors (Triton marks integers divisible by 16, so L must be; `unaligned`:
    packed sequences, which start anywhere, or B/C strided in time), T fits one vector, and the
    tile has a vector for every thread."""
    return (not unaligned and length % 16 == 0 and T * elem_size <= 16
            and d_state_block * block_d >= 32 * num_warps)


def lanes_shape(d_state_block: int, channels_per_group: int, elem_size: int, save_every: int,
                rows: int, length: int, unaligned: bool) -> dict:
    """Block sizes for the forward kernel, from the H200 sweep (benchmarks/tuning/tune_lanes.py).
    One warp per program. With many (sequence, channel) rows, 8 states per thread (fewest
    shuffles and least repeated per-step work); with few rows, 4 states per thread (twice the
    threads) and Triton's 3-stage software pipeline on the loads, since there are too few warps
    to hide the memory latency otherwise. Between 8192 and 16384 rows each chunk's inputs are
    loaded into registers one chunk ahead instead (PREFETCH; 8 x 2048: 0.438 -> 0.379 ms). It
    takes the kernel from 168 to 241 registers, which caps an SM at 8 one-warp programs: with
    more rows (16 x 512: 0.147 -> 0.171 ms) the warps hide the latency better without it. T is
    one 16-byte vector of time steps (no more than the save interval). Knob: scan_fwd_prefetch."""
    many_rows = rows >= 8192
    states_per_thread = 8 if many_rows else 4
    NL, block_d = lanes_blocks(d_state_block, states_per_thread, channels_per_group)
    T = min(max(2, 16 // elem_size), save_every)
    forced = knobs.current().scan_fwd_prefetch
    prefetch = many_rows and rows < 16384 if forced is None else forced
    return dict(BLOCK_D=block_d, NL=NL, T=T, num_warps=1, STAGES=1 if many_rows else 3, PREFETCH=prefetch,
                FAST=not interpreting(),
                ORDERED=t_in_thread(T, elem_size, d_state_block, block_d, 1, length, unaligned))


def lanes_bwd_shape(d_state_block: int, channels_per_group: int, save_every: int, elem_size: int,
                    length: int, unaligned: bool, rows: int) -> dict:
    """Block sizes for the backward kernel, from the H200 sweeps (benchmarks/tuning/tune_lanes.py
    --backward): one warp per program, 4 states per thread with many (sequence, channel) rows
    and 2 with few (twice the threads). 8 channels per program, but 4 between 8192 and 16384
    rows up to L = 4096, where 8 leaves too few warps to hide latency (8 x 2048: the backward
    1.79 -> 1.66 ms with its partial sums, though they double; 16 x 512 and the segmented long
    shapes are 10-20 % slower with 4). T = 8 steps, or the save interval where that is shorter:
    one chunk per saved state (bf16, `save_interval`) or two (fp32 and fp16, states every 16
    steps). Knobs: scan_bwd_block_d, scan_bwd_chunks."""
    tuning = knobs.current()
    many_rows = rows >= 8192
    NL, block_d = lanes_blocks(d_state_block, 4 if many_rows else 2, channels_per_group)
    if many_rows and rows < 16384 and length <= 4096:
        # twice the programs: 8 x 2048 (12288 rows) 1.79 -> 1.66 ms. The dB/dC partial rows
        # double too (0.8 GB at 8 x 2048 x 1536), hence the bound on L.
        block_d = max(1, block_d // 2)
    if tuning.scan_bwd_block_d is not None:  # a sweep's override: channels per program (more per thread)
        want = tuning.scan_bwd_block_d.split(":")
        block_d = next_power_of_2(max(1, int(want[0] if many_rows or len(want) == 1 else want[1])))
        while block_d > 1 and channels_per_group % block_d:
            block_d //= 2
    T = save_every // tuning.scan_bwd_chunks if tuning.scan_bwd_chunks is not None else min(8, save_every)
    return dict(BLOCK_D=block_d, NL=NL, T=T, num_warps=1, FAST=not interpreting(),
                ORDERED=t_in_thread(T, elem_size, d_state_block, block_d, 1, length, unaligned))


def segment_plan(rows: int, length: int, varlen: bool, save_every: int) -> tuple[int, int]:
    """(seg_len, n_segs) for a dense batch with few (sequence, channel) rows: each sequence is
    cut into n_segs segments scanned in parallel (a summary pass, then the scan from each
    segment's true start), so that rows * n_segs one-warp programs fill the GPU. (0, 1) means
    one program walks the whole sequence.

    From the H200 sweep: below 8192 rows (knob scan_seg_below) the single pass leaves the SMs
    idle (1 x 131072: 11.2 -> 3.6 ms forward); at 8 x 2048 (12288 rows) cutting only added the
    summary pass (0.44 -> 0.51 ms). When cutting, aim at 65536 rows (scan_seg_rows) with no
    segment shorter than 512 steps (scan_min_seg)."""
    tuning = knobs.current()
    if varlen or rows >= tuning.scan_seg_below:
        return 0, 1
    unit = max(64, save_every)  # 16-aligned starts (vector loads) on the save grid
    n = 1
    while rows * n < tuning.scan_seg_rows and length // (2 * n) >= tuning.scan_min_seg:
        n *= 2
    seg_len = -(-(-(-length // n)) // unit) * unit
    n_segs = -(-length // seg_len)
    return (seg_len, n_segs) if n_segs > 1 else (0, 1)


def bc_words_fit(B: torch.Tensor, C: torch.Tensor, meta: dict, align: int = 4) -> bool:
    """Whether the forward can load B and C as 32-bit words of two bf16 time steps (PREFETCH
    2): bf16 rows with unit stride along time, every chunk in bounds (EVEN) and of an even
    number of steps, and every row start `align`-byte aligned."""
    return (meta.get("EVEN", False) and meta["T"] % 2 == 0
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 and t.data_ptr() % align == 0
                    and all(2 * st % align == 0 for st in t.stride()[:-1]) for t in (B, C)))


# ---- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelLaunch:
    """One kernel's launch: its grid and meta-parameters (block sizes, flags, num_warps), and
    where the sequence is cut into n_segs segments of seg_len steps, the summary kernel's."""
    grid: tuple[int, int]
    meta: dict
    seg_len: int = 0
    n_segs: int = 1
    summary_meta: dict | None = None


@dataclass(frozen=True)
class ScanPlan:
    batch: int
    dim: int
    length: int
    d_state: int
    groups: int
    channels_per_group: int
    varlen: bool
    n_seqs: int  # sequences: the batch, or the packed sequences of cu_seqlens
    block_n: int  # d_state rounded up to a power of two
    save_every: int  # BLOCK_L: steps between the states the forward saves
    states_dtype: torch.dtype
    n_chunks: int  # saved states per dense sequence
    state_rows: int  # saved states in all
    bc_strides: tuple[int, int, int, int]  # B and C as (b, G, N, L)
    forward: KernelLaunch
    reverse: KernelLaunch  # the forward scanning from the last step down (dense, never segmented)
    backward: KernelLaunch

    def chunk_base(self, cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
        """Packed sequences: where each sequence's saved states start (exclusive sums of its
        chunk counts, on the device); None for a dense batch."""
        if cu_seqlens is None:
            return None
        counts = (cu_seqlens[1:] - cu_seqlens[:-1] + self.save_every - 1) // self.save_every
        return torch.cumsum(counts, 0) - counts

    def inference(self, B: torch.Tensor, C: torch.Tensor, reverse: bool, fixed_bc_stride: bool,
                  lanes: dict | None = None) -> KernelLaunch:
        """The forward launch of an inference scan (scan_launch.scan_inference): with `reverse` or
        `fixed_bc_stride` (Vim's padded path), each chunk's loads are issued a chunk ahead
        (Vim-Ti at 1024 px, batch 64: forward 0.841 -> 0.779 ms, reversed 0.993 -> 0.871), B and
        C as 32-bit words of two bf16 steps where their rows allow it (PREFETCH 2). That compiles
        to about 167 registers offline; uncapped, the whole model took 95.0 against 66.4 ms, as
        past 168 registers an SM holds 11 one-warp programs instead of 12 and Vim-Ti's 1,536 at
        1024 px no longer fit one wave; capped at 168, 64.9 ms with the same features. The
        reversed scan takes the words only where the rows are 16-byte aligned: with only 4-byte
        alignment the sm_90 build read wrong values there. Knob: reverse_words."""
        launch = self.reverse if reverse else self.forward
        if (not reverse and not fixed_bc_stride) or "PREFETCH" in (lanes or {}):
            return launch
        words = bc_words_fit(B, C, launch.meta, 16 if reverse else 4) and (knobs.current().reverse_words
                                                                           or not reverse)
        extra = dict(PREFETCH=2, maxnreg=168) if words else dict(PREFETCH=1)
        return dataclasses.replace(launch, meta={**launch.meta, **extra})


def _channel_block_grid(n_rows: int, dim: int, meta: dict) -> tuple[int, int]:
    return n_rows, cdiv(dim, meta["BLOCK_D"])


def _override(meta: dict, lanes: dict | None, elem_size: int, block_n: int, length: int, unaligned: bool) -> None:
    """A tuning sweep's override of a kernel's meta-parameters; whether T stays within a thread
    is worked out again for the new shape."""
    if lanes:
        meta.update(lanes)
        if "ORDERED" not in lanes:
            meta["ORDERED"] = t_in_thread(meta["T"], elem_size, block_n, meta["BLOCK_D"], meta["num_warps"],
                                          length, unaligned)


def _make_plan(u: torch.Tensor, B: torch.Tensor, A: torch.Tensor, varlen: bool, n_seqs: int,
               lanes: dict | None) -> ScanPlan:
    batch, dim, length = u.shape
    d_state = A.shape[1]
    groups = B.shape[1] if B.ndim == 4 else 1
    cpg = dim // groups
    elem_size = B.element_size()
    block_n = max(next_power_of_2(d_state), 2)
    save_every = min(save_interval(u.dtype), max(2, next_power_of_2(length)))
    n_chunks = cdiv(length, save_every)  # from L, not the longest packed sequence: no host sync
    Bv = B if B.ndim == 4 else B.unsqueeze(1)  # (b, G, N, L)
    bc_strides = (Bv.stride(0), Bv.stride(1), Bv.stride(2), Bv.stride(3))
    # B and C rows do not load as aligned 16-byte vectors along time: packed sequences start
    # anywhere, and a time stride other than 1 is no vector at all (t_in_thread)
    unaligned = varlen or bc_strides[3] != 1

    def forward_meta(rows: int) -> dict:
        meta = lanes_shape(block_n, cpg, elem_size, save_every, rows, length, unaligned)
        _override(meta, lanes, elem_size, block_n, length, unaligned)
        if "EVEN" not in (lanes or {}):  # every chunk, channel block and state in bounds: no masks
            meta["EVEN"] = (not varlen and length % meta["T"] == 0 and d_state == block_n
                            and dim % meta["BLOCK_D"] == 0)
        return meta

    seg_len, n_segs = segment_plan(n_seqs * dim, length, varlen, save_every)
    rows = n_seqs * n_segs * dim
    fwd = forward_meta(rows)
    bwd = lanes_bwd_shape(block_n, cpg, save_every, elem_size, length, unaligned, rows)
    _override(bwd, lanes, elem_size, block_n, length, unaligned)
    # the summary kernels have no register prefetch, no unmasked path and no reversed direction
    fwd_summary = {k: v for k, v in fwd.items() if k not in ("PREFETCH", "EVEN", "REVERSE")} if seg_len else None
    forward = KernelLaunch(_channel_block_grid(n_seqs * n_segs, dim, fwd), fwd, seg_len, n_segs, fwd_summary)
    backward = KernelLaunch(_channel_block_grid(n_seqs * n_segs, dim, bwd), bwd, seg_len, n_segs,
                            dict(bwd) if seg_len else None)
    # the reversed scan reads a chunk's carried state from a flipped tile. The sm_90 build read
    # the wrong step from it where a thread does not hold all of its states (NL x BLOCK_D short
    # of the warp's lanes, fp32) and where one lane holds all of a channel's states (NL = 1:
    # d_state 4, bf16, errors of 3.8-9.2 against the reference at 4 x 64 x 64 and 24 x 384 x
    # 64, right with the masked sum), so the masked sum reads it there instead
    rev_shape = forward_meta(n_seqs * dim)  # never segmented: one program a row
    ordered = (rev_shape["ORDERED"] and rev_shape["NL"] > 1
               and rev_shape["NL"] * rev_shape["BLOCK_D"] >= 32 * rev_shape["num_warps"])
    rev_shape.update(REVERSE=True, ORDERED=ordered)
    reverse = KernelLaunch(_channel_block_grid(n_seqs, dim, rev_shape), rev_shape)
    return ScanPlan(
        batch=batch, dim=dim, length=length, d_state=d_state, groups=groups, channels_per_group=cpg,
        varlen=varlen, n_seqs=n_seqs, block_n=block_n, save_every=save_every,
        # the saved states: bf16 for bf16 inputs (see save_interval), else fp32
        states_dtype=torch.bfloat16 if u.dtype == torch.bfloat16 else torch.float32,
        n_chunks=n_chunks,
        # saved chunk-start states: n_chunks per dense sequence; packed sequences end to end,
        # at most cdiv(L, save_every) + S chunks in all
        state_rows=n_chunks + n_seqs if varlen else n_seqs * n_chunks,
        bc_strides=bc_strides, forward=forward, reverse=reverse, backward=backward)


_PLANS: dict = {}
knobs.on_change(_PLANS.clear)


def plan_scan(u: torch.Tensor, B: torch.Tensor, A: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
              lanes: dict | None = None, *, cached: bool = True) -> ScanPlan:
    """The whole launch plan for these inputs: u (b, D, L), B (b, N, L) or (b, G, N, L), A (D, N);
    `lanes` overrides the kernels' meta-parameters (a tuning sweep's; such plans are not cached,
    nor those asked for with cached=False: fake tensors' shapes while torch.compile traces)."""
    varlen = cu_seqlens is not None
    n_seqs = cu_seqlens.shape[0] - 1 if varlen else u.shape[0]
    if lanes or not cached:
        return _make_plan(u, B, A, varlen, n_seqs, lanes)
    key = (u.shape, u.dtype, B.shape, B.stride(), B.dtype, A.shape, varlen, n_seqs)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(u, B, A, varlen, n_seqs, None)
    return plan
