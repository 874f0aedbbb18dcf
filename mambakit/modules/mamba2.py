"""The Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs"): the state-space dual (SSD).

    u (B, L, d_model) -> in_proj -> z (d_inner), xBC (d_inner + 2·G·N), dt (H)
    xBC -> causal depthwise conv -> SiLU -> x (H heads of P channels), B, C (G groups of N)
    y = SSD(x, dt + dt_bias (softplus, clamped to dt_limit), A = -exp(A_log), B, C, D)
    y -> gated RMSNorm with z (grouped) -> out_proj -> (B, L, d_model)

Per head h the decay is a scalar, exp(Δ_t A_h), so the scan is a masked matrix product within a
chunk plus a recurrence over chunks (`ops.ssd`). A step of decoding updates a constant-size
state: the conv's last K-1 inputs (B, conv_dim, K-1) and the SSM state (B, H, P, N) fp32.

Like the Mamba-1 mixer, it calls its submodules (in_proj, conv1d, norm, out_proj), so that
wrappers (LoRA, quantization, hooks) change what runs."""

from __future__ import annotations

import math
import torch
from torch import nn

from .. import ops
from .norm import GatedRMSNorm
from .state import (MambaState, at_least_fp32, causal_conv, causal_conv_step, conv_state_dtype, is_plain,
                    one_token, sequence_input)

# the chunk length of the SSD's torch path off CUDA: the fastest for the official shapes on a CPU
# (d_state 128, headdim 64: benchmarks/cpu.py); with 256, the official chunk_size, the 130m model's
# prefill is about 10% slower
CPU_CHUNK_SIZE = 64


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit: tuple[float, float] = (0.0, math.inf), conv_bias: bool = True, bias: bool = False,
                 norm_before_gate: bool = False, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        _check_geometry(self.d_inner, headdim, ngroups, d_state, chunk_size, A_init_range, dt_limit)
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.nheads = self.d_inner // headdim
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.layer_idx = layer_idx
        self.init_ranges = (A_init_range, dt_min, dt_max, dt_init_floor)
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias,
                                 **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, device=device, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.nheads, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.nheads, device=device, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups,
                                 norm_before_gate=norm_before_gate, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The official init: A = -U(A_init_range) per head, D = 1, and dt_bias such that
        softplus(dt_bias) is log-uniform in [dt_min, dt_max] (floored at dt_init_floor)."""
        if self.A_log.is_meta:
            return
        (a_lo, a_hi), dt_min, dt_max, floor = self.init_ranges
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(a_lo, a_hi)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus

    def A(self) -> torch.Tensor:
        """A = -exp(A_log), (H,) fp32 (fp64 for a fp64 model)."""
        return -torch.exp(at_least_fp32(self.A_log))

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """The decoding state at batch_size: the conv's last inputs in `dtype` (default: the conv's),
        and the (H, P, N) SSM state in the model's precision, as the official Mamba2 and
        transformers keep it: a bf16 / fp16 model's in its half dtype (8x Mamba-1's state per
        layer, it is what a decoding step reads and writes; each step computes in fp32 and its
        output comes from the fp32 state before it is rounded), else fp32 (fp64 for fp64)."""
        device = device or self.A_log.device
        conv_dtype = dtype or conv_state_dtype(self.conv1d)
        half = conv_dtype if conv_dtype in (torch.float16, torch.bfloat16) else None
        return MambaState(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=conv_dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=half or at_least_fp32(self.A_log).dtype),
        )

    def forward(self, hidden_states: torch.Tensor, cache: MambaState | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model). With a cache, start from its state
        and leave the final state in it. With cu_seqlens (S + 1,), the batch is one row of S
        packed sequences whose conv and SSD restart at each boundary (the cache then holds one
        state per sequence)."""
        out, final = self.forward_with_states(hidden_states, cache, cu_seqlens)
        if cache is not None:
            cache.conv.copy_(final.conv)
            cache.ssm.copy_(final.ssm)
        return out

    def forward_with_states(self, hidden_states: torch.Tensor, state: MambaState | None = None,
                            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaState]:
        """(out (B, L, d_model), the final state), starting from `state` (or zeros); nothing is
        updated in place, so gradients flow through the states (chunked training)."""
        batch, length = sequence_input("Mamba2", hidden_states, self.d_model, cu_seqlens)
        if state is not None:
            self._check_state(state, batch if cu_seqlens is None else cu_seqlens.numel() - 1)
        zxbcdt = self.in_proj(hidden_states)  # (B, L, 2·d_inner + 2·G·N + H)
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc, conv_final = causal_conv(self.conv1d, xbc.transpose(1, 2), self.d_conv,
                                      initial_state=None if state is None else state.conv,
                                      return_final_state=True, cu_seqlens=cu_seqlens)  # (B, conv_dim, L)
        x, B, C = torch.split(xbc.transpose(1, 2), [self.d_inner, self.ngroups * self.d_state,
                                                    self.ngroups * self.d_state], dim=-1)
        y, ssm_final = ops.ssd(
            x.reshape(batch, length, self.nheads, self.headdim),  # (B, L, H, P)
            dt, self.A(),  # (B, L, H), (H,)
            B.reshape(batch, length, self.ngroups, self.d_state),  # (B, L, G, N)
            C.reshape(batch, length, self.ngroups, self.d_state),
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            initial_state=None if state is None else state.ssm, return_final_state=True,
            cu_seqlens=cu_seqlens, chunk_size=self._ssd_chunk_size(hidden_states))
        y = self.norm(y.reshape(batch, length, self.d_inner), z)  # (B, L, d_inner)
        return self.out_proj(y), MambaState(conv=conv_final, ssm=ssm_final)

    def _ssd_chunk_size(self, hidden_states: torch.Tensor) -> int:
        """The SSD's chunk length: chunk_size on CUDA, at most CPU_CHUNK_SIZE elsewhere (the chunked
        torch path, whose results do not depend on it, is fastest there with short chunks)."""
        return self.chunk_size if hidden_states.is_cuda else min(self.chunk_size, CPU_CHUNK_SIZE)

    def step(self, hidden_states: torch.Tensor, cache: MambaState) -> torch.Tensor:
        """One token: hidden_states (B, d_model) or (B, 1, d_model) -> the same shape; updates
        the cache in place."""
        hidden_states, squeeze = one_token(hidden_states, self.d_model)
        batch = hidden_states.shape[0]
        self._check_state(cache, batch)
        zxbcdt = self.in_proj(hidden_states)  # (B, 2·d_inner + 2·G·N + H)
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc = causal_conv_step(self.conv1d, xbc, cache.conv, self.d_conv)  # (B, conv_dim)
        x, B, C = torch.split(xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = ops.ssd_state_update_(cache.ssm, x.reshape(batch, self.nheads, self.headdim), dt, self.A(),
                                  B.reshape(batch, self.ngroups, self.d_state),
                                  C.reshape(batch, self.ngroups, self.d_state), D=self.D, dt_bias=self.dt_bias,
                                  dt_softplus=True, dt_limit=self.dt_limit)  # (B, H, P)
        out = self.out_proj(self.norm(y.reshape(batch, self.d_inner), z))
        return out[:, None] if squeeze else out

    def plain_submodules(self) -> bool:
        """Whether in_proj, conv1d, norm and out_proj are all plain (`is_plain`), so that a decoder
        may read their weights (generation's planned CPU step does)."""
        return all(is_plain(m, cls) for m, cls in ((self.in_proj, nn.Linear), (self.conv1d, nn.Conv1d),
                                                   (self.norm, GatedRMSNorm), (self.out_proj, nn.Linear)))

    def _check_state(self, state: MambaState, batch: int) -> None:
        want_conv = (batch, self.conv_dim, self.d_conv - 1)
        want_ssm = (batch, self.nheads, self.headdim, self.d_state)
        if tuple(state.conv.shape) != want_conv or tuple(state.ssm.shape) != want_ssm:
            raise ValueError(f"cache shapes conv {tuple(state.conv.shape)} / ssm {tuple(state.ssm.shape)} do not "
                             f"match this layer and batch: expected conv {want_conv} / ssm {want_ssm}")


def _check_geometry(d_inner: int, headdim: int, ngroups: int, d_state: int, chunk_size: int,
                    A_init_range, dt_limit) -> None:
    for name, v in (("headdim", headdim), ("ngroups", ngroups), ("d_state", d_state), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if d_inner % headdim:
        raise ValueError(f"headdim {headdim} must divide d_inner = expand * d_model = {d_inner}")
    nheads = d_inner // headdim
    if nheads % ngroups:
        raise ValueError(f"ngroups {ngroups} must divide the number of heads {nheads} (d_inner / headdim)")
    if d_state > 256:
        raise ValueError(f"d_state must be at most 256, got {d_state}")
    lo, hi = A_init_range
    if not 0 < lo <= hi:
        raise ValueError(f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {A_init_range!r}")
    lo, hi = dt_limit
    if not 0 <= lo <= hi:
        raise ValueError(f"dt_limit must be (lo, hi) with 0 <= lo <= hi, got {dt_limit!r}")
