"""The planned CPU step of a Mamba-2 block: cpu_decode.py's plan for the `Mamba2` mixer.

`Mamba2.step` (the readable path, and the reference this is tested against) splits, reshapes
and allocates a few dozen tensors per layer and token. The plan prepares, once per generation:

- every intermediate buffer and every view of it, written with `out=` or in place;
- the conv state as a ring of K slots laid out (B, K, conv_dim), as Mamba-1's plan keeps it, so
  that a step writes one slot instead of shifting the (B, conv_dim, K-1) state;
- A = -exp(A_log), D and dt_bias, read once.

The SSM state (B, H, P, N) is updated where it lies: decay, then the input's outer product,
then y = h C, one pass each. At one token per step a layer streams its weights (in_proj and
out_proj, a GEMV each) and its state; everything else is dispatch, which the plan keeps small.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..modules import GatedRMSNorm, Mamba2
from .conv_ring import ConvRingState


def supports_mamba2_block(block) -> bool:
    """Whether the plan covers this block's mixer: exactly `Mamba2` (a subclass may change its
    step), its submodules plain (`is_plain`: the plan reads their weights) and its gated norm
    applied after the gate (the official layout)."""
    mixer = block.mixer
    return type(mixer) is Mamba2 and mixer.plain_submodules() and not mixer.norm.norm_before_gate


class Mamba2LayerPlan(ConvRingState):
    """One Block (norm + Mamba2 mixer) with its buffers, for batch size `batch` (fp32 models)."""

    def __init__(self, block, batch: int, norm: Callable[[torch.Tensor], torch.Tensor]):
        mixer: Mamba2 = block.mixer
        self.norm = norm
        d_inner, conv_dim, H, P, N, G, K = (mixer.d_inner, mixer.conv_dim, mixer.nheads, mixer.headdim,
                                            mixer.d_state, mixer.ngroups, mixer.d_conv)
        self.K, self.G = K, G
        f32 = dict(dtype=torch.float32)
        self.w_in, self.b_in = mixer.in_proj.weight.t(), mixer.in_proj.bias  # (d_model, 2·d_inner + 2GN + H)
        self.w_out, self.b_out = mixer.out_proj.weight.t(), mixer.out_proj.bias  # (d_inner, d_model)
        self.A = mixer.A().detach()  # (H,)
        self.D = mixer.D.detach()[:, None]  # (H, 1)
        self.dt_bias = mixer.dt_bias.detach()  # (H,)
        self.dt_limit = None if mixer.dt_limit == (0.0, math.inf) else mixer.dt_limit
        self.conv_bias = mixer.conv1d.bias
        taps = mixer.conv1d.weight.detach()[:, 0].t()  # (K, conv_dim): tap j weighs the input j steps after the oldest
        # ring slot s holds, when slot p is written, the input (s - p - 1) mod K steps after the oldest
        self.taps = [torch.stack([taps[(s - p - 1) % K] for s in range(K)]).contiguous() for p in range(K)]
        norm2: GatedRMSNorm = mixer.norm
        self.norm_weight, self.norm_eps, self.group_size = norm2.weight, norm2.eps, norm2.group_size

        self.zxbcdt = torch.empty(batch, 2 * d_inner + 2 * G * N + H, **f32)
        self.z, self.xbc_in, self.dt_raw = torch.split(self.zxbcdt, [d_inner, conv_dim, H], dim=-1)  # views
        self.ring = torch.zeros(batch, K, conv_dim, **f32)  # (B, K, conv_dim): the last K conv inputs
        self.slots = [self.ring[:, s] for s in range(K)]
        self.next_slot = K - 1
        self.tapped = torch.empty(batch, K, conv_dim, **f32)
        self.xbc = torch.empty(batch, conv_dim, **f32)  # conv output, after SiLU
        x, B, C = torch.split(self.xbc, [d_inner, G * N, G * N], dim=-1)
        self.x = x.view(batch, H, P)
        self.B = B.view(batch, G, 1, N)
        self.C = C.view(batch, G, N, 1)
        self.dt = torch.empty(batch, H, **f32)
        self.decay = torch.empty(batch, H, **f32)
        self.dtx = torch.empty(batch, H, P, **f32)
        self.ssm = torch.zeros(batch, H, P, N, **f32)
        self.ssm_groups = self.ssm.view(batch, G, H // G * P, N)  # heads of a group side by side
        self.y = torch.empty(batch, d_inner, **f32)
        self.y_cols = self.y.view(batch, G, H // G * P, 1)
        self.y_heads = self.y.view(batch, H, P)

    def step(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """residual += hidden; hidden = mixer(norm(residual)). Both (B, d_model), in place."""
        residual.add_(hidden)
        normed = self.norm(residual)
        if self.b_in is None:
            torch.mm(normed, self.w_in, out=self.zxbcdt)
        else:
            torch.addmm(self.b_in, normed, self.w_in, out=self.zxbcdt)
        self._conv()
        self._ssd()
        y = self._gated_norm()
        if self.b_out is None:
            torch.mm(y, self.w_out, out=hidden)
        else:
            torch.addmm(self.b_out, y, self.w_out, out=hidden)

    def _conv(self) -> None:
        """xbc = SiLU(causal conv): write the input into the ring, then the K taps against the ring."""
        p = self.next_slot
        self.slots[p].copy_(self.xbc_in)
        torch.mul(self.ring, self.taps[p], out=self.tapped)
        torch.sum(self.tapped, 1, out=self.xbc)
        if self.conv_bias is not None:
            self.xbc.add_(self.conv_bias)
        F.silu(self.xbc, inplace=True)
        self.next_slot = (p + 1) % self.K

    def _ssd(self) -> None:
        """h = exp(Δ A) h + Δ x Bᵀ; y = h C + D x, per head, B and C shared by a group's heads."""
        torch.add(self.dt_raw, self.dt_bias, out=self.dt)
        dt = F.softplus(self.dt)  # (B, H)
        if self.dt_limit is not None:
            dt = dt.clamp_(min=self.dt_limit[0], max=self.dt_limit[1])
        torch.mul(dt, self.A, out=self.decay).exp_()
        self.ssm.mul_(self.decay[:, :, None, None])
        torch.mul(self.x, dt[:, :, None], out=self.dtx)
        self.ssm_groups.addcmul_(self.dtx.view(self.ssm_groups.shape[:3] + (1,)), self.B)
        torch.matmul(self.ssm_groups, self.C, out=self.y_cols)
        self.y_heads.addcmul_(self.x, self.D)

    def _gated_norm(self) -> torch.Tensor:
        """GatedRMSNorm(y, z): rmsnorm(y · SiLU(z)) · weight, each group of channels on its own."""
        y = self.y.mul_(F.silu(self.z, inplace=True))  # z is a view of this step's in_proj output
        groups = y.view(y.shape[0], -1, self.group_size)
        return F.rms_norm(groups, (self.group_size,), eps=self.norm_eps).view(y.shape).mul_(self.norm_weight)
