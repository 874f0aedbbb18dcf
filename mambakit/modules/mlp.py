"""The MLPs of a hybrid block, after its mixer (the official Block's `mlp`, behind `norm2`).

`GatedMLP` is the official one: fc1 makes y and a gate side by side (2 · hidden channels),
y · SiLU(gate) goes through fc2. `MixtureOfExperts` is Jamba's sparse MLP: a router scores the
experts (gated MLPs of the same shape) for each token, the token goes through its top_k, and
their outputs are summed, weighted by the router's softmax probabilities (not renormalised over
the top_k, as Jamba). The experts run as a plain loop, each over the tokens routed to it; under
CUDA-graph capture, where the routing cannot be read back to the host, every expert runs on
every token with a zero weight where it was not chosen (the same sum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.hidden = d_model, hidden
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        y, gate = self.fc1(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.fc2(y * F.silu(gate))


class MixtureOfExperts(nn.Module):
    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int, device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.router = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(GatedMLP(d_model, hidden, device=device, dtype=dtype) for _ in range(num_experts))

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, d_model) -> (weights (N, top_k) in the tokens' dtype, experts (N, top_k)):
        the top_k softmax probabilities (in at least fp32) and their experts."""
        logits = self.router(tokens)  # (N, E)
        wide = torch.float64 if logits.dtype == torch.float64 else torch.float32  # fp64 models stay exact
        probs = torch.softmax(logits, dim=-1, dtype=wide)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, top_k)
        return weights.to(tokens.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        tokens = x.reshape(-1, self.d_model)  # (N, d_model)
        weights, chosen = self.route(tokens)
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.dense(tokens, weights, chosen).view_as(x)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == e, as_tuple=True)  # the tokens routed to e
            if token.numel():
                out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        return out.view_as(x)

    def dense(self, tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """forward's sum with no host sync: every expert on every token (N, d_model), weighted 0
        where it was not chosen."""
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            weight = (weights * (chosen == e)).sum(-1, keepdim=True)  # (N, 1)
            out = out + expert(tokens) * weight
        return out
