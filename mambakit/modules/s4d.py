"""An S4D mixer (Gu et al., 2022, "On the Parameterization and Initialization of Diagonal State
Space Models"): a linear time-invariant (LTI) diagonal SSM in the Mamba block, the baseline of
the Mamba paper's Table 1 ("S4 without gate", and with the gate "Mamba with S4" / H3-like).

    in_proj -> causal depthwise conv1d -> SiLU -> S4D SSM (+ D skip) [-> x SiLU(z)] -> out_proj

The SSM, per channel d (D_inner channels) and mode n (N/2 complex modes, d_state = N reals):

    h_k = Ā h_{k-1} + B̄ x_k,    y_k = 2 Re(sum_n C_n h_{k,n}) + D x_k

with A_n = -exp(A_log_real) + i A_imag (S4D-Lin init: A_n = -1/2 + i pi n, n = 0..N/2-1), complex
B (init 1) and C (init complex normal), a learned log step per channel (log-uniform in
[dt_min, dt_max]) and zero-order-hold discretisation: Ā = exp(dt A), B̄ = (Ā - 1) / A B. The
modes come in conjugate pairs, so N/2 complex numbers and 2 Re(.) give a real N-state SSM: the
state is (B, D_inner, N) real, the same size as the Mamba mixer's, stored as (re, im) pairs.

Because Ā, B̄, C do not depend on the input, the SSM is a convolution y = K * x + D x with
K_k = 2 Re(sum_n C_n Ā_n^k B̄_n). Two modes compute the same outputs and final states:
- "conv": K by a Vandermonde product, then an FFT convolution (O(L log L)); an initial state
  adds 2 Re(C Ā^{k+1} h_0), the final state is Ā^L h_0 + sum_j Ā^{L-1-j} B̄ x_j.
- "recurrent": the recurrence itself, as a chunked scan: every chunk runs the recurrence from
  zero (all chunks at once, chunk_size sequential steps), then the chunk-final states are
  carried across chunks (L / chunk_size steps) and each chunk's outputs corrected.
`step()` decodes one token in O(1) with the recurrence. The SSM runs in fp32 (fp64 for an
fp64 model), outside autocast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .state import MambaState, causal_conv, causal_conv_step, check_state, conv_state_dtype, linear, one_token

MODES = ("conv", "recurrent")


class S4D(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 0.001, dt_max: float = 0.1, conv_bias: bool = True, bias: bool = False,
                 gate: bool = True, mode: str = "conv", chunk_size: int = 64, layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"S4D d_state must be an even int >= 2 (d_state/2 complex modes), got {d_state!r}")
        if mode not in MODES:
            raise ValueError(f"S4D mode must be one of {MODES}, got {mode!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"S4D chunk_size must be an int >= 1, got {chunk_size!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"S4D needs 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.n_modes = d_state // 2
        self.gate, self.mode, self.chunk_size = gate, mode, chunk_size
        self.layer_idx = layer_idx
        self.dt_range = (dt_min, dt_max)

        self.in_proj = nn.Linear(d_model, (2 if gate else 1) * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        # the SSM parameters stay fp32 (like Mamba's A_log and D) whatever the model's dtype;
        # complex ones are stored as (..., 2) real pairs (optimizers and checkpoints want real tensors)
        ssm = {"device": device, "dtype": torch.float32}
        self.log_dt = nn.Parameter(torch.empty(self.d_inner, **ssm))  # (D_inner,)
        self.A_log_real = nn.Parameter(torch.empty(self.d_inner, self.n_modes, **ssm))  # (D_inner, N/2)
        self.A_imag = nn.Parameter(torch.empty(self.d_inner, self.n_modes, **ssm))  # (D_inner, N/2)
        self.B = nn.Parameter(torch.empty(self.d_inner, self.n_modes, 2, **ssm))  # (D_inner, N/2, re|im)
        self.C = nn.Parameter(torch.empty(self.d_inner, self.n_modes, 2, **ssm))  # (D_inner, N/2, re|im)
        self.D = nn.Parameter(torch.empty(self.d_inner, **ssm))  # (D_inner,)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        for p in (self.log_dt, self.A_log_real, self.A_imag, self.B, self.D):
            p._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-Lin: A_n = -1/2 + i pi n; B = 1; C ~ complex normal (unit variance); D = 1;
        dt log-uniform in [dt_min, dt_max]."""
        dt_min, dt_max = self.dt_range
        n = torch.arange(self.n_modes, dtype=self.A_imag.dtype, device=self.A_imag.device)
        self.A_log_real.fill_(math.log(0.5))
        self.A_imag.copy_(math.pi * n.expand(self.d_inner, -1))
        self.B.zero_()[..., 0] = 1.0
        self.C.normal_(0.0, math.sqrt(0.5))
        self.D.fill_(1.0)
        self.log_dt.uniform_(math.log(dt_min), math.log(dt_max))

    # ---- the SSM's parameters --------------------------------------------------------------
    def _real_dtype(self) -> torch.dtype:
        return torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt A, Ā, B̄, C), each (D_inner, N/2) complex (complex128 for an fp64 model), by
        zero-order hold: Ā = exp(dt A), B̄ = (Ā - 1) / A * B."""
        rdt = self._real_dtype()
        A = torch.complex(-torch.exp(self.A_log_real.to(rdt)), self.A_imag.to(rdt))  # (D_inner, N/2)
        dtA = torch.exp(self.log_dt.to(rdt))[:, None] * A  # (D_inner, N/2)
        A_bar = torch.exp(dtA)
        B_bar = (A_bar - 1) / A * torch.view_as_complex(self.B.to(rdt))
        return dtA, A_bar, B_bar, torch.view_as_complex(self.C.to(rdt))

    def kernel(self, length: int) -> torch.Tensor:
        """The SSM's convolution kernel K_k = 2 Re(sum_n C_n Ā_n^k B̄_n), k = 0..length-1:
        (D_inner, length) real (without the D skip)."""
        dtA, _, B_bar, C = self.discretize()
        return 2 * torch.einsum("dn,dnl->dl", C * B_bar, _powers(dtA, length)).real  # (D_inner, L)

    # ---- running ---------------------------------------------------------------------------
    def allocate_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """conv: (B, D_inner, K-1) in the model's dtype; ssm: (B, D_inner, N) fp32 (fp64 for an
        fp64 model), the N/2 complex modes as (re, im) pairs."""
        device = device or self.log_dt.device
        dtype = dtype or conv_state_dtype(self.conv1d)
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=self._real_dtype()),
        )

    def forward(self, hidden_states: torch.Tensor, cache: MambaState | None = None,
                cu_seqlens: torch.Tensor | None = None, mode: str | None = None) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model). With a cache, start from its state and
        leave the final state in it. With cu_seqlens (S + 1,), the batch is one row of S packed
        sequences, each run from its own state. mode: "conv" | "recurrent" (default self.mode)."""
        self._check_input(hidden_states)
        batch = hidden_states.shape[0]
        if cu_seqlens is not None and batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need hidden_states of batch 1, got batch {batch}")
        if cache is not None:
            check_state(cache, batch if cu_seqlens is None else cu_seqlens.numel() - 1, self)
        out, final = self._run(hidden_states, cache, cu_seqlens, mode or self.mode, cache is not None)
        if cache is not None:
            cache.conv.copy_(final.conv)
            cache.ssm.copy_(final.ssm)
        return out

    def forward_with_states(self, hidden_states: torch.Tensor, state: MambaState | None = None,
                            mode: str | None = None) -> tuple[torch.Tensor, MambaState]:
        """(out (B, L, d_model), the final state), from `state` (or zeros), nothing in place, so
        gradients flow through the states (MambaLM.chunked_loss)."""
        self._check_input(hidden_states)
        if state is not None:
            check_state(state, hidden_states.shape[0], self)
        return self._run(hidden_states, state, None, mode or self.mode, True)

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"S4D expects hidden_states of shape (B, L, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")

    def _run(self, hidden_states, state, cu_seqlens, mode, with_states):
        if mode not in MODES:
            raise ValueError(f"S4D mode must be one of {MODES}, got {mode!r}")
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*D_inner, L), or (B, D_inner, L) ungated
        x, z = xz.chunk(2, dim=1) if self.gate else (xz, None)  # (B, D_inner, L)
        conv_out = causal_conv(self.conv1d, x.contiguous(), self.d_conv,
                               initial_state=None if state is None else state.conv,
                               return_final_state=with_states, cu_seqlens=cu_seqlens)
        x, conv_final = conv_out if with_states else (conv_out, None)  # x: (B, D_inner, L)
        ssm = self._ssm_conv if mode == "conv" else self._ssm_scan
        h0 = None if state is None else _as_complex(state.ssm.to(self._real_dtype()))  # (B|S, D_inner, N/2)
        with torch.autocast(x.device.type, enabled=False):
            if cu_seqlens is None:
                y, h = ssm(x, h0, with_states)  # (B, D_inner, L), (B, D_inner, N/2)
            else:  # each packed sequence from its own state
                bounds = cu_seqlens.tolist()
                parts = [ssm(x[:, :, a:b], None if h0 is None else h0[s:s + 1], with_states)
                         for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
                y = torch.cat([p[0] for p in parts], dim=-1)
                h = torch.cat([p[1] for p in parts], dim=0) if with_states else None
        y = y.to(x.dtype)
        if z is not None:
            y = y * F.silu(z)
        out = self.out_proj(y.transpose(1, 2))  # (B, L, d_model)
        final = MambaState(conv_final, torch.view_as_real(h).flatten(-2)) if with_states else None
        return out, final

    def _ssm_conv(self, x: torch.Tensor, h0: torch.Tensor | None, with_states: bool):
        """Convolution mode. x: (B, D_inner, L) -> y (B, D_inner, L) real, final state (B, D_inner, N/2)."""
        rdt = self._real_dtype()
        x = x.to(rdt)
        length = x.shape[-1]
        dtA, A_bar, B_bar, C = self.discretize()  # (D_inner, N/2) each
        powers = _powers(dtA, length)  # (D_inner, N/2, L): Ā^k
        K = 2 * torch.einsum("dn,dnl->dl", C * B_bar, powers).real  # (D_inner, L)
        n_fft = 2 * length
        y = torch.fft.irfft(torch.fft.rfft(x, n=n_fft) * torch.fft.rfft(K, n=n_fft), n=n_fft)[..., :length]
        y = y + self.D.to(rdt)[:, None] * x  # (B, D_inner, L)
        h = None
        if h0 is not None:  # + 2 Re(C Ā^{k+1} h_0)
            y = y + 2 * torch.einsum("bdn,dnl->bdl", h0 * C, powers * A_bar[..., None]).real
        if with_states:  # Ā^L h_0 + sum_j Ā^{L-1-j} B̄ x_j
            h = torch.einsum("bdl,dnl->bdn", x.to(powers.dtype), (B_bar[..., None] * powers).flip(-1))
            if h0 is not None:
                h = h + h0 * torch.exp(dtA * length)
        return y, h

    def _ssm_scan(self, x: torch.Tensor, h0: torch.Tensor | None, with_states: bool):
        """Recurrent mode, as a chunked scan. x: (B, D_inner, L) -> y, final state (B, D_inner, N/2).
        The sequence is left-padded with zeros to a whole number of chunks; the initial state is
        placed just before the first real token (the padded prefix leaves a zero state zero)."""
        rdt = self._real_dtype()
        batch, dim, length = x.shape
        T = min(self.chunk_size, length)
        pad = (-length) % T
        n_chunks = (length + pad) // T
        _, A_bar, B_bar, C = self.discretize()  # (D_inner, N/2)
        xc = F.pad(x.to(rdt), (pad, 0)).view(batch, dim, n_chunks, T)  # (B, D_inner, nc, T)
        inject = None
        if h0 is not None:  # h0 in chunk 0, zeros elsewhere: (B, D_inner, nc, N/2)
            inject = F.pad(h0[:, :, None], (0, 0, 0, n_chunks - 1))
        Ab, Bb, Cb = A_bar[:, None], B_bar[:, None], C[:, None]  # (D_inner, 1, N/2)
        h = torch.zeros(batch, dim, n_chunks, self.n_modes, dtype=A_bar.dtype, device=x.device)
        if inject is not None and pad == 0:
            h = h + inject
        ys = []
        for t in range(T):  # every chunk's recurrence from zero, all chunks at once
            h = Ab * h + Bb * xc[..., t, None]  # (B, D_inner, nc, N/2)
            ys.append(2 * (h * Cb).sum(-1).real)  # (B, D_inner, nc)
            if inject is not None and t == pad - 1:
                h = h + inject
        y = torch.stack(ys, dim=-1)  # (B, D_inner, nc, T)
        # carry the chunk-final states across chunks: H_c = Ā^T H_{c-1} + h_c
        A_T = A_bar ** T  # (D_inner, N/2)
        carried, H = [], torch.zeros_like(h[:, :, 0])  # H: (B, D_inner, N/2)
        for c in range(n_chunks):
            carried.append(H)
            H = A_T * H + h[:, :, c]
        prev = torch.stack(carried, dim=2)  # (B, D_inner, nc, N/2): the state before each chunk
        steps = A_bar[..., None] ** torch.arange(1, T + 1, device=x.device)  # (D_inner, N/2, T): Ā^{t+1}
        y = y + 2 * torch.einsum("bdcn,dnt->bdct", prev * Cb, steps).real
        y = y.reshape(batch, dim, n_chunks * T)[..., pad:] + self.D.to(rdt)[:, None] * x.to(rdt)
        return y, (H if with_states else None)

    def step(self, hidden_states: torch.Tensor, cache: MambaState) -> torch.Tensor:
        """One token: hidden_states (B, d_model) or (B, 1, d_model) -> the same shape. Updates cache."""
        hidden_states, squeeze = one_token(hidden_states, self.d_model)
        check_state(cache, hidden_states.shape[0], self)
        rdt = self._real_dtype()
        xz = linear(self.in_proj, hidden_states)  # (B, 2*D_inner) or (B, D_inner)
        x, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)  # (B, D_inner)
        x = causal_conv_step(self.conv1d, x, cache.conv, self.d_conv)
        _, A_bar, B_bar, C = self.discretize()  # (D_inner, N/2)
        xr = x.to(rdt)
        h = _as_complex(cache.ssm)  # (B, D_inner, N/2), a view of the cache when it is fp32/fp64
        h = A_bar * h + B_bar * xr[..., None]
        cache.ssm.copy_(torch.view_as_real(h).flatten(-2))
        y = 2 * (h * C).sum(-1).real + self.D.to(rdt) * xr  # (B, D_inner)
        y = y.to(x.dtype)
        if z is not None:
            y = y * F.silu(z)
        out = linear(self.out_proj, y)
        return out[:, None] if squeeze else out


def _powers(dtA: torch.Tensor, length: int) -> torch.Tensor:
    """Ā^k = exp(k dt A) for k = 0..length-1: (D_inner, N/2) -> (D_inner, N/2, length)."""
    k = torch.arange(length, device=dtA.device, dtype=dtA.real.dtype)
    return torch.exp(dtA[..., None] * k)


def _as_complex(ssm: torch.Tensor) -> torch.Tensor:
    """(..., N) real (re, im) pairs -> (..., N/2) complex."""
    if ssm.dtype not in (torch.float32, torch.float64):
        ssm = ssm.float()
    return torch.view_as_complex(ssm.unflatten(-1, (-1, 2)).contiguous())
