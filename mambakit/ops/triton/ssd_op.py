"""The Triton Mamba-2 (SSD) scan: its autograd function and the kernels' launches.

The step sizes (Δ-bias, softplus, limit) and the in-chunk cumulative sum cs of dt·A are one
small kernel each way (ssd_dt.py). The kernels (ssd_fwd_kernels.py, ssd_bwd_kernels.py) take
dt and cs and do everything that touches x, B, C and the states. The gate z multiplies the fp32
output in torch. Packed sequences (cu_seqlens) of similar lengths run as one padded batch,
others one sequence at a time (varlen.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from ..varlen import split_varlen_ssd
from .launch import launch
from .ssd_bwd_kernels import dbc_kernel, dcb_kernel, dx_kernel, state_passing_bwd_kernel
from .ssd_dt import StepCumsum
from .ssd_fwd_kernels import cb_kernel, chunk_output_kernel, chunk_state_kernel, state_passing_kernel
from .ssd_tiles import tiles



def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
               z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: Tensor | None = None,
               return_final_state: bool = False, cu_seqlens: Tensor | None = None,
               chunk_size: int = 256) -> Tensor | tuple[Tensor, Tensor]:
    """As ops.ssd (arguments checked there). x, z: (batch, L, H, P); dt: (batch, L, H); A, dt_bias: (H,);
    B, C: (batch, L, G, N); D: (H,) or (H, P). Returns y (batch, L, H, P) [, final (batch or S, H, P, N) fp32]."""
    out_dtype = torch.float32 if z is not None else x.dtype
    D = D.contiguous() if D is not None else None  # a per-head D expanded over P (stride 0) is read as dense
    if cu_seqlens is None:
        step, cs = StepCumsum.apply(dt, A, dt_bias, dt_softplus, dt_limit, chunk_size)  # one kernel each way
        y, final = _SSD.apply(x, step, cs, B, C, D, initial_state, out_dtype)
    else:
        packing = _Packing.of(cu_seqlens, x.shape[1])
        if packing is None:  # lengths too uneven to pad: one sequence at a time
            return split_varlen_ssd(ssd_triton, x, dt, B, C, z, initial_state, cu_seqlens, return_final_state,
                                    A=A, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                                    chunk_size=chunk_size)
        x_pad, dt_pad, B_pad, C_pad = (packing.pad(t) for t in (x, dt, B, C))  # (S, L_max, ...)
        step, cs = StepCumsum.apply(dt_pad, A, dt_bias, dt_softplus, dt_limit, chunk_size, packing.lengths)
        y, final = _SSD.apply(x_pad, step, cs, B_pad, C_pad, D, initial_state, out_dtype)
        y = packing.unpad(y)
    if z is not None:
        y = (y * F.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_state else y


class _Packing:
    """Packed sequences (batch 1, cu_seqlens) laid out as a padded batch (S, L_max): with dt = 0
    on the padding, which neither decays nor feeds the state, each row's final state is its
    sequence's, and the kernels run once for all of them. Used where the padding is at most as
    long as the sequences themselves."""

    def __init__(self, index: Tensor, valid: Tensor, lengths: Tensor):
        self.index, self.valid = index, valid  # (S, L_max) positions in the packed sequence, and which are real
        self.lengths = lengths  # (S,) int32

    @classmethod
    def of(cls, cu_seqlens: Tensor, length: int) -> "_Packing | None":
        offsets = cu_seqlens.to(torch.int64)
        lengths = offsets[1:] - offsets[:-1]  # (S,)
        longest = int(lengths.max())
        if lengths.numel() * longest > 2 * max(length, 1) or longest == 0:
            return None
        steps = torch.arange(longest, device=cu_seqlens.device)
        valid = steps[None, :] < lengths[:, None]  # (S, L_max)
        index = (offsets[:-1, None] + steps[None, :]).clamp(max=max(length - 1, 0))
        return cls(index, valid, lengths.to(torch.int32))

    def pad(self, t: Tensor) -> Tensor:
        """(1, L, ...) -> (S, L_max, ...); the padding repeats the last position (its step is 0)."""
        return t[0][self.index]

    def unpad(self, t: Tensor) -> Tensor:
        """(S, L_max, ...) -> (1, L, ...)"""
        return t[self.valid][None]


def _run(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) through launch.py's cache (less host time per launch)."""
    launch(kernel, grid, list(args), kwargs)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _blocks(size: int, cap: int) -> int:
    """A power-of-two tile edge covering `size` (at least 16, tl.dot's minimum), at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact products; else bf16/fp16 tensor cores


class _SSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, cs, B, C, D, initial_state, out_dtype):
        ctx.b_dtype, ctx.c_dtype = B.dtype, C.dtype
        x = _last_dim_contiguous(x)
        bc_dtype = torch.promote_types(B.dtype, C.dtype)
        B, C = _last_dim_contiguous(B.to(bc_dtype)), _last_dim_contiguous(C.to(bc_dtype))
        batch, length, heads, headdim = x.shape
        groups, d_state = B.shape[2], B.shape[3]
        _, _, n_chunks, T = cs.shape
        precision = _precision(x.dtype)
        CB = x.new_empty((batch, n_chunks, groups, T, T), dtype=torch.float32)
        states = x.new_empty((batch, n_chunks, heads, headdim, d_state), dtype=torch.float32)
        final = x.new_empty((batch, heads, headdim, d_state), dtype=torch.float32)
        y = x.new_empty((batch, length, heads, headdim), dtype=out_dtype)

        t = tiles("cb", d_state)
        bt = _blocks(T, t["block_t"])
        _run(cb_kernel, (batch * n_chunks * groups * triton.cdiv(T, bt) ** 2,),
            C, B, CB, length, T, n_chunks, groups, d_state, *C.stride()[:3], *B.stride()[:3],
            BLOCK_M=bt, BLOCK_S=bt, BLOCK_K=_blocks(d_state, t["block_k"]), PRECISION=precision,
            num_warps=t["num_warps"], num_stages=t["num_stages"])
        _chunk_states(x, B, step, cs, states, forward=True)
        init = initial_state.contiguous() if initial_state is not None else None
        _pass_states(states, cs, init, final)
        t = tiles("chunk_output", d_state)
        bm, bp = _blocks(T, t["block_m"]), _blocks(headdim, t["block_p"])
        _run(chunk_output_kernel, (batch * n_chunks * heads * triton.cdiv(T, bm) * triton.cdiv(headdim, bp),),
            x, step, cs, CB, states, C, D if D is not None else x, y, length, T, n_chunks, heads, groups, headdim,
            d_state, *x.stride()[:3], *C.stride()[:3], *y.stride()[:3],
            HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.ndim == 2,
            BLOCK_M=bm, BLOCK_P=bp, BLOCK_S=_blocks(T, t["block_s"]), BLOCK_K=_blocks(d_state, t["block_k"]),
            PRECISION=precision, num_warps=t["num_warps"], num_stages=t["num_stages"])
        ctx.save_for_backward(x, step, cs, B, C, D, CB, states, y)  # y: the decays' gradient (ssd_bwd_kernels.py)
        ctx.has_init = initial_state is not None
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, step, cs, B, C, D, CB, states, y = ctx.saved_tensors
        batch, length, heads, headdim = x.shape
        groups, d_state = B.shape[2], B.shape[3]
        _, _, n_chunks, T = cs.shape
        precision = _precision(x.dtype)
        dy = _last_dim_contiguous(dy.to(x.dtype)) if dy is not None else torch.zeros_like(x)

        dstates = x.new_empty((batch, n_chunks, heads, headdim, d_state), dtype=torch.float32)
        _chunk_states(dy, C, step, cs, dstates, forward=False)
        dcs_end = x.new_zeros((batch, heads, n_chunks), dtype=torch.float32)
        dinit = x.new_empty((batch, heads, headdim, d_state), dtype=torch.float32) if ctx.has_init else None
        dfinal = dfinal.contiguous() if dfinal is not None else None
        pn = headdim * d_state
        t = tiles("state_passing_bwd", d_state)
        _run(state_passing_bwd_kernel, (batch * heads, triton.cdiv(pn, t["block"])),
            dstates, states, cs, dfinal if dfinal is not None else dstates, dinit if dinit is not None else dstates,
            dcs_end, T, n_chunks, heads, pn, HAS_DFINAL=dfinal is not None, HAS_DINIT=dinit is not None,
            BLOCK=t["block"], GROUP=t["group"], num_warps=t["num_warps"])

        full_p = _blocks(headdim, 256)
        want_dD = D is not None and ctx.needs_input_grad[5]
        dD = torch.zeros(D.shape, device=x.device, dtype=torch.float32) if want_dD else None
        dx = torch.empty_like(x)
        ddt = x.new_zeros((batch, heads, n_chunks, T), dtype=torch.float32)  # step's layout
        dcs = x.new_zeros((batch, heads, n_chunks, T), dtype=torch.float32)
        t = tiles("dx", d_state)
        bs = _blocks(T, t["block_s"])
        _run(dx_kernel, (batch * n_chunks * heads * triton.cdiv(T, bs),),
            x, step, cs, CB, dstates, B, D if D is not None else x, dy, y, dx, ddt, dcs, dcs_end,
            dD if want_dD else dcs_end, length, T, n_chunks, heads, groups, headdim, d_state,
            *x.stride()[:3], *B.stride()[:3], *dy.stride()[:3], *y.stride()[:3], *dx.stride()[:3],
            HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.ndim == 2, WANT_DD=want_dD,
            BLOCK_S=bs, BLOCK_T=_blocks(T, t["block_t"]), BLOCK_P=full_p, BLOCK_K=_blocks(d_state, t["block_k"]),
            PRECISION=precision, num_warps=t["num_warps"], num_stages=t["num_stages"])

        per_group = heads // groups
        t = tiles("dcb", d_state)
        bt, bs = _blocks(T, t["block_t"]), _blocks(T, t["block_s"])
        per_program = _heads_per_program(per_group, batch * n_chunks * groups * triton.cdiv(T, bt) * triton.cdiv(T, bs)
                                         // 2, t["min_programs"])
        dcb_splits = per_group // per_program
        dCB = x.new_empty((dcb_splits, batch, n_chunks, groups, T, T), dtype=torch.float32)
        _run(dcb_kernel, (batch * n_chunks * groups * dcb_splits * triton.cdiv(T, bt) * triton.cdiv(T, bs),),
            x, step, cs, dy, dCB, length, T, n_chunks, heads, groups, headdim, per_program, dCB[0].numel(),
            *x.stride()[:3], *dy.stride()[:3],
            BLOCK_T=bt, BLOCK_S=bs, BLOCK_K=_blocks(headdim, t["block_k"]), PRECISION=precision,
            num_warps=t["num_warps"], num_stages=t["num_stages"])

        t = tiles("dbc", d_state)
        block, block_n = _blocks(T, t["block"]), _blocks(d_state, t["block_n"])
        n_blocks = triton.cdiv(d_state, block_n)
        per_program = _heads_per_program(per_group, batch * n_chunks * groups * triton.cdiv(T, block) * n_blocks,
                                         t["min_programs"])
        splits = per_group // per_program
        dB = x.new_empty((splits, batch, length, groups, d_state), dtype=torch.float32)
        dC = torch.empty_like(dB)
        _run(dbc_kernel, (batch * n_chunks * groups * splits * triton.cdiv(T, block) * n_blocks,),
            x, step, cs, dCB, states, dstates, B, C, dy, dB, dC,
            length, T, n_chunks, heads, groups, headdim, d_state, per_program, dB[0].numel(), dCB[0].numel(),
            dcb_splits, *x.stride()[:3], *B.stride()[:3], *C.stride()[:3], *dy.stride()[:3],
            BLOCK=block, BLOCK_N=block_n, BLOCK_P=full_p, PRECISION=precision,
            num_warps=t["num_warps"], num_stages=t["num_stages"])
        dcs[..., T - 1] += dcs_end
        dB, dC = dB.sum(0) if splits > 1 else dB[0], dC.sum(0) if splits > 1 else dC[0]
        dD = dD.to(D.dtype) if dD is not None else None
        dinit = dinit.to(ctx.init_dtype) if dinit is not None else None
        return dx, ddt, dcs, dB.to(ctx.b_dtype), dC.to(ctx.c_dtype), dD, dinit, None


def _chunk_states(X, Y, step, cs, out, forward):
    """chunk_state_kernel into out (batch, c, H, P, N): forward, each chunk's contribution to the
    state at its end (X = x, Y = B); backward, the gradient of each chunk's start state (X = dy, Y = C)."""
    batch, length, heads, headdim = X.shape
    _, _, n_chunks, T = cs.shape
    groups, d_state = Y.shape[2], Y.shape[3]
    t = tiles("chunk_state" if forward else "chunk_state_bwd", d_state)
    bp, bn = _blocks(headdim, t["block_p"]), _blocks(d_state, t["block_n"])
    _run(chunk_state_kernel, (batch * n_chunks * heads, triton.cdiv(headdim, bp), triton.cdiv(d_state, bn)),
         X, Y, step, cs, out, length, T, n_chunks, heads, groups, headdim, d_state, *X.stride()[:3], *Y.stride()[:3],
         FORWARD=forward, BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=_blocks(T, t["block_k"]), PRECISION=_precision(X.dtype),
         num_warps=t["num_warps"], num_stages=t["num_stages"])


def _pass_states(states, cs, init, final):
    """state_passing_kernel: states (batch, c, H, P, N) from each chunk's contribution to the state
    each chunk starts from, in place; the last state into final (batch, H, P, N)."""
    batch, n_chunks, heads, headdim, d_state = states.shape
    T = cs.shape[3]
    pn = headdim * d_state
    t = tiles("state_passing", d_state)
    _run(state_passing_kernel, (batch * heads, triton.cdiv(pn, t["block"])),
         states, cs, init if init is not None else states, final, T, n_chunks, heads, pn,
         HAS_INIT=init is not None, BLOCK=t["block"], GROUP=t["group"], num_warps=t["num_warps"])


def _heads_per_program(heads_per_group: int, programs_per_head: int, min_programs: int) -> int:
    """How many of a group's heads one backward program runs (summing their dB, dC in registers):
    the most that still leaves at least min_programs programs, and a divisor of heads_per_group."""
    for per_program in range(heads_per_group, 0, -1):
        if heads_per_group % per_program == 0 and programs_per_head * (heads_per_group // per_program) >= min_programs:
            return per_program
    return 1
