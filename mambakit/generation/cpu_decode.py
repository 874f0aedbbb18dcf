"""CPU decoding with a planned step: the CPU counterpart of cuda_graph.py.

On a CPU, one decode step of a small model is a few GEMVs that stream the weights from memory
and a few hundred tiny ops whose cost is dispatch, not arithmetic. `Mamba.step` (the readable
path, and the reference this is tested against) creates a few dozen views and temporaries per
layer. A plan prepares, once per generation, everything that does not change between steps:

- every intermediate buffer, and every view of it, is allocated once and written with `out=`;
- the conv state lives in a ring of K slots laid out (B, K, D), so a step writes one slot
  instead of shifting the (B, D, K-1) state, and reads it contiguously;
- A = -exp(A_log) and the conv taps rotated for each ring position are computed once.

`load` and `store` move a cache's state in and out, as for the CUDA-graph decoder, so the
caller's cache is exactly what `Mamba.step` would have left.

A plan is built for each generation and never reused across them: it holds values derived
from the parameters (A, the taps), and a parameter's version counter cannot tell whether they
are stale, since torch's fused optimizers update parameters without bumping it. For the same
reason it keeps no transposed copy of the lm_head, though MKL streams the (d_model, V) layout
faster at one token per step: the copy costs more (about 0.3 s for the 130m model) than it
saves over a typical generation.

Mamba-2 blocks get the same treatment from cpu_decode_mamba2.py's plan (a model's blocks may be
of either kind); `CpuDecoder` is the same for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import LayerNorm, Mamba, RMSNorm, is_plain
from .conv_ring import ConvRingState
from .cpu_decode_mamba2 import Mamba2LayerPlan, supports_mamba2_block


def _norm_fn(norm):
    """The block's norm as a function of a (B, dim) fp32 tensor (the plan runs fp32 models only)."""
    if isinstance(norm, RMSNorm):
        return lambda x: F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return lambda x: F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class _LayerPlan(ConvRingState):
    """One Block (norm + Mamba mixer) with its buffers, for batch size `batch`."""

    def __init__(self, block, batch: int):
        mixer: Mamba = block.mixer
        self.norm = _norm_fn(block.norm)
        D, N, R, K = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
        self.K = K
        f32 = dict(dtype=torch.float32)
        self.w_in, self.b_in = mixer.in_proj.weight.t(), mixer.in_proj.bias  # (d_model, 2D)
        self.w_x = mixer.x_proj.weight.t()  # (D, R + 2N)
        self.w_dt, self.b_dt = mixer.dt_proj.weight.t(), mixer.dt_proj.bias  # (R, D), (D,)
        self.w_out, self.b_out = mixer.out_proj.weight.t(), mixer.out_proj.bias  # (D, d_model)
        self.A = mixer.A().detach()  # (D, N)
        self.D = mixer.D.detach()
        self.conv_bias = mixer.conv1d.bias
        taps = mixer.conv1d.weight.detach()[:, 0].t()  # (K, D): tap j multiplies the input j steps after the oldest
        # ring slot s holds, when slot p is written, the input (s - p - 1) mod K steps after the oldest
        self.taps = [torch.stack([taps[(s - p - 1) % K] for s in range(K)]).contiguous() for p in range(K)]  # K x (K, D)

        self.xz = torch.empty(batch, 2 * D, **f32)
        self.x, self.z = self.xz[:, :D], self.xz[:, D:]  # (B, D) views
        self.ring = torch.zeros(batch, K, D, **f32)  # (B, K, D): the last K conv inputs
        self.slots = [self.ring[:, s] for s in range(K)]
        self.next_slot = K - 1
        self.tapped = torch.empty(batch, K, D, **f32)
        self.xc = torch.empty(batch, D, **f32)  # conv output, after SiLU
        self.xdbl = torch.empty(batch, R + 2 * N, **f32)
        self.dt_low = self.xdbl[:, :R]
        self.B = self.xdbl[:, R:R + N][:, None, :]  # (B, 1, N)
        self.C = self.xdbl[:, R + N:][:, :, None]  # (B, N, 1)
        self.dt = torch.empty(batch, D, **f32)
        self.dA = torch.empty(batch, D, N, **f32)
        self.dtx = torch.empty(batch, D, **f32)
        self.ssm = torch.zeros(batch, D, N, **f32)
        self.y = torch.empty(batch, D, **f32)
        self.y_col = self.y[:, :, None]  # (B, D, 1)

    def step(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """residual += hidden; hidden = mixer(norm(residual)). Both (B, d_model), in place."""
        residual.add_(hidden)
        normed = self.norm(residual)
        if self.b_in is None:
            torch.mm(normed, self.w_in, out=self.xz)
        else:
            torch.addmm(self.b_in, normed, self.w_in, out=self.xz)
        # causal conv: write x into the ring, then the K taps against the ring as it stands
        p = self.next_slot
        self.slots[p].copy_(self.x)
        torch.mul(self.ring, self.taps[p], out=self.tapped)
        torch.sum(self.tapped, 1, out=self.xc)
        if self.conv_bias is not None:
            self.xc.add_(self.conv_bias)
        F.silu(self.xc, inplace=True)
        self.next_slot = (p + 1) % self.K
        # selective state update: h = exp(ΔA) h + Δ x B; y = <h, C> + D x, gated by SiLU(z)
        torch.mm(self.xc, self.w_x, out=self.xdbl)
        torch.addmm(self.b_dt, self.dt_low, self.w_dt, out=self.dt)
        dt = F.softplus(self.dt)
        torch.mul(dt[:, :, None], self.A, out=self.dA)
        self.ssm.mul_(self.dA.exp_())
        torch.mul(dt, self.xc, out=self.dtx)
        self.ssm.addcmul_(self.dtx[:, :, None], self.B)
        torch.bmm(self.ssm, self.C, out=self.y_col)
        self.y.addcmul_(self.xc, self.D).mul_(F.silu(self.z))
        if self.b_out is None:
            torch.mm(self.y, self.w_out, out=hidden)
        else:
            torch.addmm(self.b_out, self.y, self.w_out, out=hidden)


class CpuDecoder:
    """A MambaLM's decode step for one batch size on CPU, with the GraphedDecoder interface:
    load(cache), __call__(token) -> logits (B, V) (a buffer overwritten by the next call), store(cache)."""

    def __init__(self, model, batch_size: int):
        backbone = model.backbone
        d_model = model.config.d_model
        self.embedding = backbone.embedding.weight
        self.layers = [_layer_plan(block, batch_size) for block in backbone.layers]
        self.norm_f = _norm_fn(backbone.norm_f)
        self.lm_head_t = model.lm_head.weight.t()  # (d_model, V), a view
        self.lm_head_bias = model.lm_head.bias
        self.hidden = torch.empty(batch_size, d_model)
        self.residual = torch.empty(batch_size, d_model)
        self.logits = torch.empty(batch_size, self.lm_head_t.shape[1])

    def load(self, cache) -> None:
        for plan, state in zip(self.layers, cache.layers):
            plan.load(state)

    def store(self, cache) -> None:
        for plan, state in zip(self.layers, cache.layers):
            plan.store(state)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        torch.index_select(self.embedding, 0, token, out=self.hidden)
        self.residual.zero_()
        for plan in self.layers:
            plan.step(self.hidden, self.residual)
        self.residual.add_(self.hidden)
        normed = self.norm_f(self.residual)
        if self.lm_head_bias is None:
            return torch.mm(normed, self.lm_head_t, out=self.logits)
        return torch.addmm(self.lm_head_bias, normed, self.lm_head_t, out=self.logits)


def _layer_plan(block, batch: int):
    if isinstance(block.mixer, Mamba):
        return _LayerPlan(block, batch)
    return Mamba2LayerPlan(block, batch, _norm_fn(block.norm))  # mamba2.py's mixer


def supports_cpu_decoder(model) -> bool:
    """The plan covers fp32 MambaLMs on CPU whose blocks are gated Mamba mixers or Mamba-2 mixers
    (cpu_decode_mamba2.py) with RMSNorm or LayerNorm and no MLP; anything else (S4D or attention
    layers, a hybrid's MLPs, other dtypes, and any wrapped submodule: a LoRA layer, a quantized
    Linear, a hook, whose weights the plan must not read) decodes through model.step."""
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return False
    return (all(getattr(b, "mlp", None) is None for b in model.backbone.layers)  # a hybrid's MLP: not planned
            and all(_plain_mixer(b.mixer) or supports_mamba2_block(b) for b in model.backbone.layers)
            and all(_plain_norm(b.norm) for b in model.backbone.layers) and _plain_norm(model.backbone.norm_f)
            and is_plain(model.lm_head, nn.Linear) and is_plain(model.backbone.embedding, nn.Embedding))


def _plain_mixer(mixer) -> bool:
    return isinstance(mixer, Mamba) and mixer.gate and mixer.plain_submodules()


def _plain_norm(norm) -> bool:
    return is_plain(norm, RMSNorm) or is_plain(norm, LayerNorm)


def cpu_decoder(model, batch_size: int) -> CpuDecoder | None:
    """A planned CPU decoder for one generation at this batch size, or None where the plan
    does not apply (then generation steps through model.step)."""
    if torch.is_grad_enabled() or not supports_cpu_decoder(model):
        return None
    return CpuDecoder(model, batch_size)
