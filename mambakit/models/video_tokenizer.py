"""Video as a token sequence (after VideoMamba): non-overlapping t x p x p tubelets embedded by a
Conv3d (kernel = stride = tubelet), with a learned spatial position embedding (per patch of a
frame) plus a learned temporal one (per tubelet slot in time).

    video (B, C, T, H, W) -> tokens (B, T'*H'*W', D), time-major: frame slot after frame slot,
    each in raster order; pos (1, T'*H'*W', D); `order()` is that GridOrder over (T', H', W')."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .scan_orders import GridOrder


@dataclass
class TubeletConfig:
    frames: int = 8
    img_size: int = 224
    tubelet: int = 2  # frames per tubelet
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 192

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.frames // self.tubelet, self.img_size // self.patch_size, self.img_size // self.patch_size

    def check(self) -> None:
        for name in ("frames", "img_size", "tubelet", "patch_size", "in_chans", "dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.frames % self.tubelet:
            raise ValueError(f"frames {self.frames} is not divisible by tubelet {self.tubelet}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")


class TubeletTokenizer(nn.Module):
    def __init__(self, cfg: TubeletConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        t, h, w = cfg.grid
        size = (cfg.tubelet, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=size, stride=size)
        self.pos_spatial = nn.Parameter(torch.zeros(1, 1, h * w, cfg.dim))
        self.pos_temporal = nn.Parameter(torch.zeros(1, t, 1, cfg.dim))
        nn.init.trunc_normal_(self.pos_spatial, std=0.02)
        nn.init.trunc_normal_(self.pos_temporal, std=0.02)

    def order(self, axes: tuple[int, int, int] = (0, 1, 2)) -> GridOrder:
        """The scan path over the (T', H', W') token grid: (0, 1, 2) is time-major, the tokens'
        own order; (1, 2, 0) visits each patch's tubelets through time before the next patch."""
        return GridOrder(self.cfg.grid, [axes])

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video (B, C, T, H, W) -> (tokens (B, T'H'W', D), pos (1, T'H'W', D))."""
        c = self.cfg
        want = (c.in_chans, c.frames, c.img_size, c.img_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"expected video (B, {', '.join(map(str, want))}) as (B, C, T, H, W), "
                             f"got {tuple(video.shape)}")
        tokens = self.proj(video).flatten(2).transpose(1, 2)  # (B, T'*H'*W', D), (t, h, w) row-major
        pos = (self.pos_temporal + self.pos_spatial).flatten(1, 2)  # (1, T', H'W', D) -> (1, T'H'W', D)
        return tokens, pos
