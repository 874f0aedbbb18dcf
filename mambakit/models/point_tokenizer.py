"""Point clouds as token sequences (after Point-MAE / PointMamba): farthest-point sampling picks
G group centres, each centre's k nearest points form a local patch, a small PointNet (a shared
MLP on the centred points, max-pooled) embeds each patch, and the groups are ordered along a
space-filling curve through their centres, so that a 1-D scan sees 3-D neighbours one after
another. The position embedding is an MLP of the centre coordinates.

    points (B, P, 3) -> tokens (B, G, D), positions (B, G, D), centres (B, G, 3), order (B, G)

`order[b]` is the permutation that sorted the groups of cloud b (in FPS order) along the curve;
the tokens come out already sorted, so the encoder scans them as given."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .space_filling import CURVES, curve_order


def farthest_point_sample(xyz: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """xyz (B, P, 3) -> (B, n) int64 indices: greedy farthest-point sampling, batched,
    deterministic (it starts at point `start` of every cloud; ties go to the lowest index)."""
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"expected points (B, P, 3), got {tuple(xyz.shape)}")
    batch, p, _ = xyz.shape
    if not 1 <= n <= p:
        raise ValueError(f"cannot sample {n} points from clouds of {p}")
    xyz = xyz.detach()
    idx = torch.empty(batch, n, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, p), float("inf"), dtype=xyz.dtype, device=xyz.device)  # (B, P) to the chosen set
    current = torch.full((batch,), start, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(n):
        idx[:, i] = current
        d = ((xyz - xyz[rows, current][:, None]) ** 2).sum(-1)  # (B, P)
        nearest = torch.minimum(nearest, d)
        current = nearest.argmax(dim=1)  # the first of the farthest
    return idx


def knn_group(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, 3) points, (B, G, 3) centres -> (B, G, k) indices of each centre's k nearest
    points (nearest first)."""
    if not 1 <= k <= xyz.shape[1]:
        raise ValueError(f"k={k} neighbours needs clouds of at least k points, got {xyz.shape[1]}")
    d = torch.cdist(centres.detach(), xyz.detach())  # (B, G, P)
    return d.topk(k, dim=-1, largest=False).indices


def gather_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, P, C), idx (B, ...) -> (B, ..., C)."""
    b = x.shape[0]
    flat = idx.reshape(b, -1)  # (B, M)
    out = x.gather(1, flat[..., None].expand(-1, -1, x.shape[-1]))  # (B, M, C)
    return out.view(*idx.shape, x.shape[-1])


@dataclass
class PointTokenizerConfig:
    dim: int = 192
    num_groups: int = 64
    group_size: int = 32  # k nearest neighbours per centre
    hidden: int = 128  # PointNet width
    curve: str = "hilbert"  # "hilbert" or "z"
    bits: int = 10  # grid resolution of the curve, per axis

    def check(self) -> None:
        for name in ("dim", "num_groups", "group_size", "hidden", "bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.curve not in CURVES:
            raise ValueError(f"curve must be one of {CURVES}, got {self.curve!r}")


class MiniPointNet(nn.Module):
    """(B, G, k, 3) centred points -> (B, G, D): shared MLP, max-pool, then the pooled feature
    joined to every point's and a second shared MLP, max-pool (Point-MAE's two stages)."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(3, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.second = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                                    nn.Linear(2 * hidden, dim))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        f = self.first(points)  # (B, G, k, H)
        pooled = f.amax(dim=2, keepdim=True).expand_as(f)  # (B, G, k, H)
        return self.second(torch.cat([f, pooled], dim=-1)).amax(dim=2)  # (B, G, D)


class PointTokenizer(nn.Module):
    def __init__(self, cfg: PointTokenizerConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.embed = MiniPointNet(cfg.hidden, cfg.dim)
        self.pos = nn.Sequential(nn.Linear(3, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

    def group(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xyz (B, P, 3) -> (centres (B, G, 3) sorted along the curve, neighbourhoods
        (B, G, k, 3) relative to their centres, order (B, G): the sort of the FPS centres)."""
        if xyz.ndim != 3 or xyz.shape[-1] != 3:
            raise ValueError(f"expected points (B, P, 3), got {tuple(xyz.shape)}")
        centre_idx = farthest_point_sample(xyz, self.cfg.num_groups)  # (B, G), FPS order
        order = curve_order(gather_points(xyz, centre_idx), self.cfg.bits, self.cfg.curve)  # (B, G)
        centre_idx = centre_idx.gather(1, order)  # (B, G), curve order
        centres = gather_points(xyz, centre_idx)  # (B, G, 3)
        neighbours = gather_points(xyz, knn_group(xyz, centres, self.cfg.group_size))  # (B, G, k, 3)
        return centres, neighbours - centres[:, :, None], order

    def forward(self, xyz: torch.Tensor) -> dict:
        """xyz (B, P, 3) -> {"tokens": (B, G, D), "pos": (B, G, D), "centres": (B, G, 3), "order": (B, G)}."""
        centres, local, order = self.group(xyz)
        return {"tokens": self.embed(local), "pos": self.pos(centres), "centres": centres, "order": order}
