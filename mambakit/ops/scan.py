"""The chunked selective scan in pure torch: runs on any device and is the CPU default.

L is cut into chunks of T steps. Within a chunk the per-step states (T, B, D, N) are built
in one reused buffer, scanned with `linear_scan_` (a step loop or a Hillis-Steele
associative scan), contracted with C, and dropped; only the (B, D, N) state at each chunk
boundary is carried on (and, when a gradient is needed, saved). So the memory for the
states is bounded by T, not by L. The backward pass walks the chunks in reverse and
recomputes each chunk's states from its saved start state.

Everything is laid out time-major, (L, B, D) and (L, B, D, N), so that the slice for one
step is contiguous. Inputs are cast to fp32 (fp64 for fp64 inputs) chunk by chunk.

The defaults (`auto_chunk_size`, DEFAULT_INNER) were chosen by `benchmarks/scan_cpu.py`;
BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_scan_args, compute_dtype
from .recording import records_grad
from .varlen import split_varlen

DEFAULT_INNER = "sequential"
INNER_METHODS = ("sequential", "hillis_steele")
CHUNK_ELEMENTS = 2**23  # per (T, B, D, N) work buffer: 32 MiB of fp32
MIN_CHUNK, MAX_CHUNK = 16, 128


def auto_chunk_size(batch: int, dim: int, d_state: int) -> int:
    """The largest power of two T in [16, 128] with T*B*D*N <= CHUNK_ELEMENTS, so the chunk's
    buffers stay in the last-level cache. Measured on 2 cores: (B=1, D=1536, N=16) is fastest at
    T=64..256 and (B=4, ...) at T=32..64, while T=16 pays per-chunk overhead."""
    T = MAX_CHUNK
    while T > MIN_CHUNK and T * batch * dim * d_state > CHUNK_ELEMENTS:
        T //= 2
    return T


# ---- reusable scratch buffers ------------------------------------------------------------------

_scratch = threading.local()
_SCRATCH_MAX_BYTES = 256 * 2**20


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (T, b, D, N) work buffer, reused across calls on CPU. A fresh multi-MB
    CPU allocation is mmap'ed and page-faulted in on first touch, which cost more than the
    scan itself for short sequences (a 32-token prefill: 1.5 ms per buffer per layer).
    CUDA's caching allocator already reuses memory, so other devices allocate normally, and so
    does a traced call (torch.compile, torch.export): a module-level buffer written in the graph
    would be a mutated constant, which torch.export's decompositions and ONNX export refuse."""
    numel = 1
    for n in shape:
        numel *= n
    if device.type != "cpu" or torch.compiler.is_compiling() or numel * dtype.itemsize > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


# ---- the linear recurrence h_t = a_t h_{t-1} + x_t, in place over the time axis ---------------

def linear_scan_(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, method: str) -> None:
    """x[t] <- a[t] * x[t-1] + x[t] along dim 0, with x[-1] = h0. a, x: (T, ...); h0: x[0]'s shape.
    The "hillis_steele" method overwrites `a`."""
    if h0 is not None:
        x[0].addcmul_(a[0], h0)
    if method == "sequential":
        xs, as_ = x.unbind(0), a.unbind(0)  # views made once: cheaper than indexing per step
        for t in range(1, len(xs)):
            xs[t].addcmul_(as_[t], xs[t - 1])
    elif method == "hillis_steele":
        # after the step with offset k, x[t] holds the scan of the 2k steps ending at t and
        # a[t] their product of decays; log2(T) rounds of whole-chunk vector ops.
        k = 1
        while k < x.shape[0]:
            x_tail = torch.addcmul(x[k:], a[k:], x[:-k])
            a_tail = a[k:] * a[:-k]
            x[k:] = x_tail
            a[k:] = a_tail
            k *= 2
    else:
        raise ValueError(f"inner must be one of {INNER_METHODS}, got {method!r}")


def reverse_linear_scan_(a: torch.Tensor, x: torch.Tensor, carry: torch.Tensor | None, method: str) -> None:
    """x[t] <- a[t+1] * x[t+1] + x[t], from the end, with a[T] * x[T] = carry."""
    if carry is not None:
        x[-1].add_(carry)
    if method == "sequential":
        xs, as_ = x.unbind(0), a.unbind(0)
        for t in range(len(xs) - 2, -1, -1):
            xs[t].addcmul_(as_[t + 1], xs[t + 1])
    else:
        a_rev = torch.cat([a[1:], torch.ones_like(a[:1])]).flip(0)  # a_rev[s] multiplies x[T-s]
        x_rev = x.flip(0)
        linear_scan_(a_rev, x_rev, None, method)
        x.copy_(x_rev.flip(0))


# ---- one chunk -----------------------------------------------------------------------------------

def _chunk_states(dt, u, A, B, h0, groups, method, dA_out, H_out):
    """States of one chunk. dt, u: (T, b, D); A: (D, N); B: (T, b, G, N); h0: (b, D, N).
    Writes exp(dt A) into dA_out and the states into H_out, both (T, b, D, N)."""
    T, b, dim = dt.shape
    N = A.shape[1]
    torch.mul(dt[..., None], A, out=dA_out)
    dA_out.exp_()  # (T, b, D, N)
    torch.mul((dt * u).view(T, b, groups, dim // groups, 1), B.view(T, b, groups, 1, N),
              out=H_out.view(T, b, groups, dim // groups, N))  # Δ·B·u: (T, b, D, N)
    linear_scan_(dA_out.clone() if method != "sequential" else dA_out, H_out, h0, method)


def _contract_C(H, C, groups, out):
    """y_t = <h_t, C_t>: H (T, b, D, N), C (T, b, G, N) -> out (T, b, D), as one batched matmul."""
    T, b, dim, N = H.shape
    torch.bmm(H.view(T * b * groups, dim // groups, N), C.reshape(T * b * groups, N, 1),
              out=out.view(T * b * groups, dim // groups, 1))


def softplus(x):
    """log(1 + exp(x)), stable, and several times faster than F.softplus on CPU."""
    return torch.log1p(torch.exp(-x.abs())).add_(x.clamp(min=0))


class _ChunkReader:
    """Reads one chunk [s, e) of the scan inputs as time-major, contiguous tensors in the
    compute dtype: (T, b, D) for u, delta, z and (T, b, G, N) for B and C. An input whose
    memory is already time-major (as the Mamba mixer's are) is read without a copy."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt):
        self.u, self.delta, self.z, self.cdt = u, delta, z, cdt
        self.B = B if B.ndim == 4 else B.unsqueeze(1)  # (b, G, N, L)
        self.C = C if C.ndim == 4 else C.unsqueeze(1)
        self.A = A.to(cdt)  # (D, N)
        self.D = None if D is None else D.to(cdt)
        self.bias = None if delta_bias is None else delta_bias.to(cdt)
        self.softplus = delta_softplus

    def time_major(self, x, s, e):
        view = x[..., s:e].movedim(-1, 0)
        if view.dtype == self.cdt and view.is_contiguous():
            return view
        return torch.empty(view.shape, dtype=self.cdt, device=view.device).copy_(view)

    def read(self, s, e):
        """-> u (T, b, D), dt_raw (T, b, D), dt (T, b, D), B (T, b, G, N), C (T, b, G, N)."""
        u = self.time_major(self.u, s, e)
        dt_raw = self.time_major(self.delta, s, e)
        if self.bias is not None:
            dt_raw = dt_raw + self.bias
        dt = softplus(dt_raw) if self.softplus else dt_raw
        return u, dt_raw, dt, self.time_major(self.B, s, e), self.time_major(self.C, s, e)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size, method,
                save_for_grad):
        cdt = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
        b, dim, L = u.shape
        N = A.shape[1]
        groups = B.shape[1] if B.ndim == 4 else 1
        reader = _ChunkReader(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt)
        h = (torch.zeros(b, dim, N, dtype=cdt, device=u.device) if initial_state is None
             else initial_state.to(cdt).clone())  # (b, D, N)

        T = min(chunk_size, L)
        dA_buf = scratch("fwd_dA", (T, b, dim, N), cdt, u.device)
        H_buf = scratch("fwd_H", (T, b, dim, N), cdt, u.device)
        out_tm = torch.empty(L, b, dim, dtype=cdt, device=u.device)  # (L, b, D)
        y_pre = torch.empty_like(out_tm) if (save_for_grad and z is not None) else None
        starts = []
        for s in range(0, L, T):
            e = min(s + T, L)
            n = e - s
            if save_for_grad:
                starts.append(h)
            u_c, _, dt_c, B_c, C_c = reader.read(s, e)
            _chunk_states(dt_c, u_c, reader.A, B_c, h, groups, method, dA_buf[:n], H_buf[:n])
            y_c = out_tm[s:e]
            _contract_C(H_buf[:n], C_c, groups, out=y_c)
            if D is not None:
                y_c.addcmul_(u_c, reader.D)
            if z is not None:
                if y_pre is not None:
                    y_pre[s:e] = y_c
                y_c.mul_(F.silu(reader.time_major(z, s, e)))
            h = H_buf[n - 1].clone()
        if save_for_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, torch.stack(starts), y_pre)
            ctx.config = (delta_softplus, T, method, cdt)
        return out_tm.to(u.dtype).permute(1, 2, 0), h  # (b, D, L), (b, D, N)

    @staticmethod
    def backward(ctx, dout, dfinal):
        u, delta, A, B, C, D, z, delta_bias, initial_state, starts, y_pre = ctx.saved_tensors
        delta_softplus, T, method, cdt = ctx.config
        b, dim, L = u.shape
        N = A.shape[1]
        groups = B.shape[1] if B.ndim == 4 else 1
        Dg = dim // groups
        reader = _ChunkReader(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cdt)
        A_c = reader.A

        def new(*shape):
            return torch.empty(*shape, dtype=cdt, device=u.device)

        du_tm, ddt_tm, dz_tm = new(L, b, dim), new(L, b, dim), (new(L, b, dim) if z is not None else None)
        dB_tm, dC_tm = new(L, b, groups, N), new(L, b, groups, N)
        dA = torch.zeros(dim, N, dtype=cdt, device=u.device)
        dD = torch.zeros(dim, dtype=cdt, device=u.device)
        dA_buf, H_buf, G_buf, X_buf = (scratch(f"bwd_{name}", (T, b, dim, N), cdt, u.device)
                                       for name in ("dA", "H", "G", "X"))
        carry = None if dfinal is None else dfinal.to(cdt)  # gradient flowing into the chunk's last state
        chunk_starts = list(range(0, L, T))
        for c in reversed(range(len(chunk_starts))):
            s = chunk_starts[c]
            e = min(s + T, L)
            n = e - s
            h0 = starts[c]
            dA_c, H, Gr, X = dA_buf[:n], H_buf[:n], G_buf[:n], X_buf[:n]
            u_c, dt_raw_c, dt_c, B_c, C_c = reader.read(s, e)
            dy_c = reader.time_major(dout, s, e)  # (n, b, D)
            if z is not None:  # through out = y * silu(z)
                z_c = reader.time_major(z, s, e)
                sig = torch.sigmoid(z_c)
                dz_tm[s:e] = dy_c * y_pre[s:e] * sig * (1 + z_c * (1 - sig))
                dy_c = dy_c * z_c * sig
            _chunk_states(dt_c, u_c, A_c, B_c, h0, groups, method, dA_c, H)
            # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}
            torch.mul(dy_c.view(n, b, groups, Dg, 1), C_c.view(n, b, groups, 1, N),
                      out=Gr.view(n, b, groups, Dg, N))
            reverse_linear_scan_(dA_c, Gr, carry, method)
            carry = dA_c[0] * Gr[0]
            M = n * b * groups  # (t, b, g) rows: batched row-vector x matrix products, no permuted copies
            dC_tm[s:e] = torch.matmul(dy_c.reshape(M, 1, Dg), H.view(M, Dg, N)).view(n, b, groups, N)
            # X_t = g_t * a_t * h_{t-1}: the gradient through a_t = exp(Δ_t A), times a_t
            torch.mul(Gr[1:], H[:-1], out=X[1:])
            torch.mul(Gr[0], h0, out=X[0])
            X.mul_(dA_c)
            gB = torch.matmul(Gr.view(M, Dg, N), B_c.reshape(M, N, 1)).view(n, b, dim)
            ddt_c = torch.einsum("tbdn,dn->tbd", X, A_c).addcmul_(u_c, gB)
            dA += X.mul_(dt_c.unsqueeze(-1)).sum((0, 1))  # X is not needed after this; einsum permutes (slow)
            if delta_softplus:
                ddt_c.mul_(torch.sigmoid(dt_raw_c))
            ddt_tm[s:e] = ddt_c
            du_c = du_tm[s:e]
            torch.mul(dt_c, gB, out=du_c)
            if D is not None:
                du_c.addcmul_(dy_c, reader.D)
                dD += (dy_c * u_c).sum((0, 1))
            dB_tm[s:e] = torch.matmul((dt_c * u_c).reshape(M, 1, Dg), Gr.view(M, Dg, N)).view(n, b, groups, N)

        def back(g, like):  # time-major -> the input's layout and dtype
            g = g.movedim(0, -1)
            if like.ndim == 3 and g.ndim == 4:  # ungrouped B/C: (b, 1, N, L) -> (b, N, L)
                g = g.squeeze(1)
            return g.to(like.dtype)

        return (back(du_tm, u), back(ddt_tm, delta), dA.to(A.dtype), back(dB_tm, B), back(dC_tm, C),
                None if D is None else dD.to(D.dtype), None if z is None else back(dz_tm, z),
                None if delta_bias is None else ddt_tm.sum((0, 1)).to(delta_bias.dtype),
                None if initial_state is None else carry.to(initial_state.dtype),
                None, None, None, None)


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                           z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                           initial_state: Tensor | None = None, return_final_state: bool = False,
                           cu_seqlens: Tensor | None = None, chunk_size: int | None = None,
                           inner: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Same signature and results as `selective_scan_ref`; see the module docstring."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    if chunk_size is None:
        chunk_size = auto_chunk_size(u.shape[0], u.shape[1], A.shape[1])
    inner = DEFAULT_INNER if inner is None else inner
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if inner not in INNER_METHODS:
        raise ValueError(f"inner must be one of {INNER_METHODS}, got {inner!r}")
    if cu_seqlens is not None:
        return split_varlen(selective_scan_chunked, u, delta, B, C, z, initial_state, cu_seqlens,
                            return_final_state, A=A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus,
                            chunk_size=chunk_size, inner=inner)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = records_grad(*inputs)
    y, final = _ChunkedScan.apply(*inputs, delta_softplus, chunk_size, inner, save)
    return (y, final) if return_final_state else y
