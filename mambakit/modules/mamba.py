"""The Mamba mixer (Gu & Dao, 2023): in_proj -> causal depthwise conv1d -> SiLU -> selective
scan (gated by SiLU(z)) -> out_proj, with the official initialisation. With gate=False there
is no z branch (in_proj makes x only and the scan output is not gated): the Mamba paper's
Table 1 "without gate" variant.

`forward(x, cache)` runs over L tokens; with a cache it starts from the cached conv and SSM
states and leaves the final ones there. `step(x, cache)` continues one token at a time. The
cache has a constant size, (B, D_inner, K-1) + (B, D_inner, N), whatever the length.

The fused paths take in_proj's, conv1d's, x_proj's, dt_proj's and out_proj's weights only where
each is a plain module (`state.is_plain`); a wrapped one (peft LoRA, a quantized Linear, a hook)
is called, each on its own, with the same math."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .state import (MambaState, at_least_fp32, causal_conv, causal_conv_step, check_state, conv_state_dtype, is_plain,
                    linear, linear_on_channels, one_token, sequence_input)


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True,
                 bias: bool = False, layer_idx: int | None = None, gate: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.gate = gate
        self.dt_init = (dt_min, dt_max, dt_init_floor, dt_scale)

        self.in_proj = nn.Linear(d_model, (2 if gate else 1) * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The official init: A = -(1..N) per channel, D = 1, dt_proj so that softplus(bias)
        is log-uniform in [dt_min, dt_max] (floored), dt_proj.weight ~ U(±dt_scale/sqrt(dt_rank))."""
        dt_min, dt_max, floor, scale = self.dt_init
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5 * scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner, device=self.A_log.device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True
        self.dt_proj.bias._no_weight_decay = True

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        device = device or self.A_log.device
        dtype = dtype or conv_state_dtype(self.conv1d)
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def A(self) -> torch.Tensor:
        """A = -exp(A_log), (D_inner, N) fp32, computed on every call. It is not memoised: a
        memo keyed on A_log's version counter went stale after training with fused AdamW
        (torch's fused optimizers update parameters without bumping their version), so every
        evaluation after the first one ran with the first one's A."""
        return -torch.exp(at_least_fp32(self.A_log))

    @torch.no_grad()
    def step_sizes(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The step sizes Δ = softplus(dt_proj(x) + bias) that the scan uses on these inputs,
        (B, D_inner, L) fp32, from a zero state: a readable recomputation for diagnostics (how
        long each channel keeps what it stores: exp(ΔA) per step), not a fast path."""
        x = self.in_proj(hidden_states)[..., :self.d_inner]  # (B, L, D_inner)
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :hidden_states.shape[1]])  # (B, D_inner, L), causal
        dt, _, _ = self._ssm_params(self.x_proj(x.transpose(1, 2)))  # (B, L, R)
        if is_plain(self.dt_proj, nn.Linear):  # the scan adds the bias in fp32
            delta = F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float()
        else:
            delta = self.dt_proj(dt).float()
        return F.softplus(delta).transpose(1, 2)

    def _ssm_params(self, x_dbl: torch.Tensor, dim: int = -1):
        """x_dbl with R + 2N along `dim` -> dt (R), B (N), C (N) along it, as views."""
        return torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=dim)

    def forward(self, hidden_states: torch.Tensor, cache: MambaState | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (B, L, d_model) -> (B, L, d_model). With a cache, start from its state
        and leave the final state in it. With cu_seqlens (S + 1,), the batch is one row of S
        packed sequences: the conv and the scan restart at each boundary, and the cache holds
        one state per sequence (batch S)."""
        batch, _ = sequence_input("Mamba", hidden_states, self.d_model, cu_seqlens)
        if cache is not None:
            check_state(cache, batch if cu_seqlens is None else cu_seqlens.numel() - 1, self)
        out, final = self._run(hidden_states, cache, cu_seqlens)
        if cache is not None:
            cache.conv.copy_(final.conv)
            cache.ssm.copy_(final.ssm)
        return out

    def forward_with_states(self, hidden_states: torch.Tensor, state: MambaState | None = None
                            ) -> tuple[torch.Tensor, MambaState]:
        """hidden_states: (B, L, d_model) -> (out (B, L, d_model), the final state), starting
        from `state` (or zeros). Nothing is updated in place: gradients flow from the final
        state back into `state`, so a long sequence can be run chunk by chunk with the exact
        gradient (see MambaLM.chunked_loss)."""
        batch, _ = sequence_input("Mamba", hidden_states, self.d_model)
        if state is not None:
            check_state(state, batch, self)
        out, final = self._run(hidden_states, state, None, always_states=True)
        return out, final

    def _run(self, hidden_states, state, cu_seqlens, always_states=False):
        """Every (B, C, L) tensor handed to the conv and the scan is laid out for the kernel that
        reads it: on CUDA channels-first, contiguous along L (the Triton kernels read L as
        vectors); elsewhere time-major, contiguous along C (the chunked torch scan works on
        (T, B, D) slices, which then need no copy). No projection makes a transposed copy in
        either layout (see _project)."""
        with_states = state is not None or always_states
        time_major = _time_major(hidden_states)
        xz = self._in(hidden_states, time_major)  # (B, 2*D_inner, L)
        x, z = xz.split(self.d_inner, dim=1) if self.gate else (xz, None)  # (B, D_inner, L) each
        A = self.A()  # (D_inner, N)
        fusable = (is_plain(self.conv1d, nn.Conv1d) and is_plain(self.x_proj, nn.Linear)
                   and is_plain(self.dt_proj, nn.Linear))  # conv_proj_scan takes their weights
        if not time_major and not with_states and fusable:
            # conv, x_proj and the scan in one op: its Triton training path holds the conv's
            # input for the backward, not its output, and Δ's low-rank input, not Δ
            # the gate rides in xz, so that xz's gradient comes back whole in its own layout
            y = ops.conv_proj_scan(xz, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight,
                                   self.dt_proj.weight, A, D=at_least_fp32(self.D),
                                   delta_bias=at_least_fp32(self.dt_proj.bias), cu_seqlens=cu_seqlens,
                                   gate_in_x=self.gate)  # (B, D_inner, L)
            return self._out(y, time_major), None
        conv_out = causal_conv(self.conv1d, x, self.d_conv, initial_state=None if state is None else state.conv,
                               return_final_state=with_states, cu_seqlens=cu_seqlens)
        x, conv_final = conv_out if with_states else (conv_out, None)  # x: (B, D_inner, L)
        x_dbl = self._linear(self.x_proj, x, time_major)  # (B, R + 2N, L)
        dt, B, C = self._ssm_params(x_dbl, dim=1)  # (B, R|N|N, L)
        scan_kw = dict(D=at_least_fp32(self.D), z=z, delta_softplus=True,
                       initial_state=None if state is None else state.ssm,
                       return_final_state=with_states, cu_seqlens=cu_seqlens)
        if not is_plain(self.dt_proj, nn.Linear):  # called: Δ before the softplus, its bias included
            delta = linear_on_channels(self.dt_proj, dt, contiguous_time=not time_major)  # (B, D_inner, L)
            scan_out = ops.selective_scan(x, delta, A, B, C, **scan_kw)
        elif time_major:
            delta = _project(self.dt_proj.weight, dt, time_major)  # (B, D_inner, L)
            scan_out = ops.selective_scan(x, delta, A, B, C, delta_bias=at_least_fp32(self.dt_proj.bias), **scan_kw)
        else:  # Δ = dt_proj(dt) formed inside: the Triton scan's backward keeps dt (B, R, L), not Δ
            inference = ops.no_autograd(hidden_states, *self.parameters())  # then y goes over the conv output
            scan_out = ops.selective_scan_dt_proj(x, dt, self.dt_proj.weight, A, B, C,
                                                  delta_bias=at_least_fp32(self.dt_proj.bias), **scan_kw,
                                                  out=x if inference else None)
        y, ssm_final = scan_out if with_states else (scan_out, None)  # y: (B, D_inner, L)
        return self._out(y, time_major), (MambaState(conv_final, ssm_final) if with_states else None)

    def _in(self, hidden_states: torch.Tensor, time_major: bool) -> torch.Tensor:
        """in_proj of hidden_states (B, L, d_model) -> xz (B, 2*D_inner, L) in the layout of
        `time_major` (a view, C contiguous; or L contiguous)."""
        if not is_plain(self.in_proj, nn.Linear):  # called
            xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*D_inner, L), C contiguous
            return xz if time_major else xz.contiguous()
        batch, length, _ = hidden_states.shape
        if time_major:
            xz = F.linear(hidden_states, self.in_proj.weight).transpose(1, 2)  # (B, 2*D_inner, L), C contiguous
        else:
            xz = self.in_proj.weight @ hidden_states.reshape(batch * length, -1).t()  # (2*D_inner, B*L)
            xz = xz.view(-1, batch, length).transpose(0, 1)  # (B, 2*D_inner, L), L contiguous
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        return xz

    @staticmethod
    def _linear(module: nn.Module, x: torch.Tensor, time_major: bool) -> torch.Tensor:
        """A projection over the channels of x (B, C, L) -> (B, O, L), its bias included: on its
        weight through _project where it is plain, else called."""
        if not is_plain(module, nn.Linear):
            return linear_on_channels(module, x, contiguous_time=not time_major)
        out = _project(module.weight, x, time_major)  # (B, O, L)
        if module.bias is not None:
            out = out + module.bias[:, None].to(out.dtype)
        return out

    def _out(self, y: torch.Tensor, time_major: bool) -> torch.Tensor:
        """out_proj of the scan output y (B, D_inner, L) -> (B, L, d_model)."""
        # (B, L, d_model), a view; its consumer (the residual add) reads it once
        return self._linear(self.out_proj, y, time_major).transpose(1, 2)

    def step(self, hidden_states: torch.Tensor, cache: MambaState) -> torch.Tensor:
        """One token: hidden_states (B, d_model) or (B, 1, d_model) -> the same shape. Updates cache."""
        hidden_states, squeeze = one_token(hidden_states, self.d_model)
        check_state(cache, hidden_states.shape[0], self)
        # The shapes are guaranteed here, so this calls the unchecked in-place updates, and
        # F.linear rather than plain Linear modules: at one token per step, overhead is the cost.
        xz = linear(self.in_proj, hidden_states)  # (B, 2*D_inner), or (B, D_inner) ungated
        x, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)  # (B, D_inner)
        x = causal_conv_step(self.conv1d, x, cache.conv, self.d_conv)
        dt, B, C = self._ssm_params(linear(self.x_proj, x))  # dt: (B, R), low rank
        if is_plain(self.dt_proj, nn.Linear):
            y = ops.dt_proj_state_update_(cache.ssm, x, dt, self.dt_proj.weight, self.dt_proj.bias, self.A_log, B, C,
                                          D=self.D, z=z)
        else:  # called: Δ before the softplus, its bias included
            y = ops.selective_state_update_(cache.ssm, x, self.dt_proj(dt), self.A(), B, C, D=self.D, z=z,
                                            dt_softplus=True)
        out = linear(self.out_proj, y)
        return out[:, None] if squeeze else out

    def plain_submodules(self) -> bool:
        """Whether in_proj, conv1d, x_proj, dt_proj and out_proj are all plain (`is_plain`), so
        that a decoder may read their weights (generation's planned CPU step does)."""
        return all(is_plain(m, cls) for m, cls in ((self.in_proj, nn.Linear), (self.conv1d, nn.Conv1d),
                                                   (self.x_proj, nn.Linear), (self.dt_proj, nn.Linear),
                                                   (self.out_proj, nn.Linear)))


def _time_major(hidden_states: torch.Tensor) -> bool:
    """The layout of the mixer's (B, C, L) tensors: time-major off CUDA (the chunked torch scan),
    channels-first on CUDA (the Triton kernels). A function, so that a CPU test can run the
    channels-first path."""
    return not hidden_states.is_cuda


def _project(weight: torch.Tensor, x: torch.Tensor, time_major: bool) -> torch.Tensor:
    """weight (O, C) applied to x (B, C, L) -> (B, O, L): time-major (a GEMM over the (B, L, C)
    view, whose rows are contiguous when x is time-major) or channels-first (batched_linear)."""
    if time_major:
        return F.linear(x.transpose(1, 2), weight.to(x.dtype)).transpose(1, 2)
    return ops.batched_linear(weight, x)
