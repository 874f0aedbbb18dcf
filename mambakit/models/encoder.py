"""The bidirectional Mamba encoder that every tokenizer feeds (images, video, point clouds).

tokens (B, L, dim) + position embeddings (B or 1, L, dim) -> hidden states (B, L, dim), in the
token order it was given. Vim's arrangement: prenorm residual blocks (mambakit's `Block`:
residual <- residual + hidden; hidden <- mixer(norm(residual))) with a residual stream kept in
fp32, then a final norm of residual + hidden.

Each layer runs one `BiMamba` per path of the scan order (models/scan_orders.py). With one
path that is the identity (raster with Vim, or tokens a tokenizer has ordered) the tokens are
scanned as given. With several (the cross-scan), each path gathers the tokens in its order,
scans them both ways, scatters the outputs back, and the layer output is their mean.

For inference on the Triton kernels (identity order) the encoder pads the sequence once to a
multiple of 16 steps and runs every layer on the padded rows (BiMamba's `length`), then drops
the padding before the final norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules.bimamba import BiMamba
from ..modules.block import Block
from ..modules.norm import make_norm
from ..ops import no_autograd
from .scan_orders import IdentityOrder, ScanOrder


@dataclass
class EncoderConfig:
    d_model: int = 192
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    n_paths: int = 1  # bidirectional mixers per layer: 1 (Vim), 2 (cross-scan)
    rms_norm: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    divide_out: bool = True  # Vim's (y_f + y_b) / 2
    drop_path_rate: float = 0.0  # stochastic depth of the last layer's mixer output (0 at the first)

    def check(self) -> None:
        for name in ("d_model", "n_layer", "d_state", "d_conv", "expand", "n_paths"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")


def drop_path(hidden: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): in training, each sample's (B, L, D) output is
    zeroed with probability `rate` and the kept ones scaled by 1 / (1 - rate); the identity in
    eval or at rate 0."""
    if not training or rate == 0.0:
        return hidden
    keep = hidden.new_empty(hidden.shape[0], *(1,) * (hidden.ndim - 1)).bernoulli_(1.0 - rate)  # (B, 1, 1)
    return hidden * keep.div_(1.0 - rate)


class PathMixer(nn.Module):
    """One BiMamba per scan path; the paths' outputs, back in sequence order, are averaged."""

    def __init__(self, cfg: EncoderConfig, layer_idx: int):
        super().__init__()
        self.paths = nn.ModuleList(
            BiMamba(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, divide_out=cfg.divide_out, layer_idx=layer_idx)
            for _ in range(cfg.n_paths))

    def forward(self, hidden: torch.Tensor, order: ScanOrder, length: int | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); with `length`, the steps from it to L are padding (identity order only)."""
        if order.is_identity():
            return self.paths[0](hidden, length=length)
        if length is not None and length != hidden.shape[1]:
            raise ValueError("padded sequences take the identity scan order only")
        out = None
        for k, mixer in enumerate(self.paths):
            y = order.unscan(mixer(order.scan(hidden, k)), k)  # (B, L, D) in sequence order
            out = y if out is None else out + y
        return out / len(self.paths)


class PathBlock(Block):
    """mambakit's prenorm residual block, with a PathMixer that takes the scan order."""

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, order: ScanOrder,
                length: int | None = None):
        hidden, residual = self._pre_inference(hidden, residual)
        return self.mixer(hidden, order, length), residual


class MambaEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.layers = nn.ModuleList(
            PathBlock(cfg.d_model, PathMixer(cfg, i), make_norm(cfg.d_model, cfg.rms_norm, cfg.norm_eps),
                      cfg.residual_in_fp32)
            for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg.d_model, cfg.rms_norm, cfg.norm_eps)
        # timm's schedule: the rate grows linearly from 0 at the first layer to drop_path_rate
        self.drop_path_rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None,
                order: ScanOrder | None = None, keep: int | None = None) -> torch.Tensor:
        """tokens (B, L, D), pos (B or 1, L, D) added to them, order over L tokens with
        cfg.n_paths paths (None: the tokens' own order). Returns the normed hidden (B, L, D), or
        with `keep` only that token's, (B, 1, D) (the final residual add and norm of the others
        are skipped: a classifier that reads one token needs no more)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.d_model:
            raise ValueError(f"the encoder expects tokens (B, L, {self.cfg.d_model}), got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        order = IdentityOrder(length) if order is None else order
        if order.length != length or order.num_paths != self.cfg.n_paths:
            raise ValueError(f"scan order has {order.num_paths} path(s) over {order.length} tokens; the encoder "
                             f"has {self.cfg.n_paths} path(s) and got {length} tokens")
        if keep is not None and not -length <= keep < length:
            raise ValueError(f"keep must index one of the {length} tokens, got {keep}")
        padded = self._padded_length(tokens, pos, order)
        if padded == length:
            hidden = tokens if pos is None else tokens + pos  # (B, L, D)
        else:  # zero steps after each sequence: whole 16-step rows for the Triton scan
            dtype = tokens.dtype if pos is None else torch.result_type(tokens, pos)
            hidden = tokens.new_empty(tokens.shape[0], padded, tokens.shape[2], dtype=dtype)  # (B, Lp, D)
            if pos is None:
                hidden[:, :length].copy_(tokens)
            else:
                torch.add(tokens, pos, out=hidden[:, :length])
            hidden[:, length:].zero_()
        residual = None
        for layer, rate in zip(self.layers, self.drop_path_rates):
            hidden, residual = layer(hidden, residual, order, length if padded != length else None)
            hidden = drop_path(hidden, rate, self.training)  # the mixer output, before the residual add
        keep = slice(0, length) if keep is None else slice(keep % length, keep % length + 1)
        residual = hidden[:, keep] if residual is None else residual[:, keep] + hidden[:, keep]
        return self.norm_f(residual.to(self.norm_f.weight.dtype))  # (B, L or 1, D)

    def _padded_length(self, tokens: torch.Tensor, pos: torch.Tensor | None, order: ScanOrder) -> int:
        """The sequence length the layers run at: L rounded up to a multiple of 16 when every
        mixer takes its padded Triton path (identity order, nothing recorded for a backward;
        see BiMamba._padded_inference), else L itself."""
        length = tokens.shape[1]
        if length % 16 == 0 or not order.is_identity() or not self.layers:
            return length
        if pos is not None and (not no_autograd(pos) or torch.result_type(tokens, pos) == torch.float64):
            return length
        if not self.layers[0].mixer.paths[0]._triton_inference(tokens):
            return length
        return -(-length // 16) * 16
