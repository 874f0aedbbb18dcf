"""Scan orders: in which order a 1-D scan visits the tokens of an image, a video or a point cloud.

A ScanOrder over L tokens has K paths; path k visits the tokens paths[k, 0], paths[k, 1], ...
(a permutation of 0..L-1), and `inverse()` undoes it. The encoder (models/encoder.py) runs one
bidirectional mixer per path, so every path is also scanned backwards:

- `raster(h, w)`: one row-major path (Vision Mamba). With the bidirectional mixer: 2 directions.
- `cross_scan(h, w)`: row-major and column-major paths; with their reverses, the four-way
  cross-scan of VMamba (`directions()` lists the four). The encoder merges the paths' outputs
  back into raster order (the mean over paths) after every layer.
- `GridOrder((T, H, W), [(0, 1, 2)])`: a video's tubelets, time-major (each frame in raster
  order, frame after frame); (1, 2, 0) would scan each pixel's tubelets over time first.
- `with_token(order, at)`: the order over L + 1 tokens where an extra token (the class token)
  sits at sequence position `at` and every path visits it at the middle of the path.

The point-cloud order depends on the data (a space-filling curve through each cloud's group
centres), so the point tokenizer sorts its groups itself and hands the encoder an identity
order; see models/point_tokenizer.py."""

from __future__ import annotations

import torch


class ScanOrder:
    """K permutations of L token positions. Subclasses define `_paths()` -> (K, L) int64."""

    def __init__(self):
        self._cache: dict = {}

    def _paths(self) -> torch.Tensor:
        raise NotImplementedError

    def paths(self, device=None) -> torch.Tensor:
        """(K, L) int64: path k visits sequence positions paths[k, 0], paths[k, 1], ..."""
        key = ("paths", str(device))
        if key not in self._cache:
            self._cache[key] = self._paths().to(device)
        return self._cache[key]

    def inverse(self, device=None) -> torch.Tensor:
        """(K, L) int64: the step at which path k visits each sequence position
        (paths[k][inverse[k]] == arange(L))."""
        key = ("inverse", str(device))
        if key not in self._cache:
            self._cache[key] = torch.argsort(self.paths(device), dim=1)
        return self._cache[key]

    @property
    def num_paths(self) -> int:
        return self.paths().shape[0]

    @property
    def length(self) -> int:
        return self.paths().shape[1]

    def is_identity(self) -> bool:
        if "identity" not in self._cache:
            p = self.paths()
            self._cache["identity"] = p.shape[0] == 1 and bool((p[0] == torch.arange(p.shape[1])).all())
        return self._cache["identity"]

    def directions(self) -> torch.Tensor:
        """(2K, L): every path, then every path reversed: the scans a bidirectional encoder runs."""
        p = self.paths()
        return torch.cat([p, p.flip(-1)])

    def scan(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x (B, L, D) in sequence order -> (B, L, D) in the order of path k."""
        self._check(x)
        return x.index_select(1, self.paths(x.device)[k])

    def unscan(self, y: torch.Tensor, k: int) -> torch.Tensor:
        """y (B, L, D) in the order of path k -> (B, L, D) in sequence order."""
        self._check(y)
        return y.index_select(1, self.inverse(y.device)[k])

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.length:
            raise ValueError(f"{type(self).__name__} is over {self.length} tokens; expected (B, {self.length}, D), "
                             f"got {tuple(x.shape)}")


class GridOrder(ScanOrder):
    """Paths over an N-d grid of tokens stored in row-major (C) order: each path is the
    row-major order of the grid with its axes permuted by one of `axis_orders` (the first axis
    of the tuple varies slowest)."""

    def __init__(self, shape: tuple[int, ...], axis_orders: list[tuple[int, ...]]):
        super().__init__()
        shape = tuple(shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"GridOrder: shape must be positive ints, got {shape}")
        if not axis_orders:
            raise ValueError("GridOrder needs at least one axis order")
        for order in axis_orders:
            if sorted(order) != list(range(len(shape))):
                raise ValueError(f"GridOrder: {order} is not a permutation of the axes of a {len(shape)}-d grid")
        self.shape, self.axis_orders = shape, [tuple(o) for o in axis_orders]

    def _paths(self) -> torch.Tensor:
        index = torch.arange(int(torch.tensor(self.shape).prod())).view(self.shape)  # raster index per cell
        return torch.stack([index.permute(order).reshape(-1) for order in self.axis_orders])  # (K, L)


def raster(h: int, w: int) -> GridOrder:
    """Row-major over an h x w grid: Vision Mamba's order."""
    return GridOrder((h, w), [(0, 1)])


def cross_scan(h: int, w: int) -> GridOrder:
    """Row-major and column-major paths over an h x w grid; with their reverses, VMamba's
    four-way cross-scan."""
    return GridOrder((h, w), [(0, 1), (1, 0)])


class WithToken(ScanOrder):
    """`base` over L tokens, extended to L + 1 sequence positions where an extra token sits at
    position `at` (the others shift by one after it); each path visits it at its middle step."""

    def __init__(self, base: ScanOrder, at: int):
        super().__init__()
        if not 0 <= at <= base.length:
            raise ValueError(f"WithToken: position {at} is outside 0..{base.length}")
        self.base, self.at = base, at

    def _paths(self) -> torch.Tensor:
        p = self.base.paths()  # (K, L) over the base tokens
        seq = p + (p >= self.at).long()  # base token i sits at sequence position i (+1 from `at` on)
        mid = p.shape[1] // 2
        extra = torch.full((p.shape[0], 1), self.at, dtype=torch.long)
        return torch.cat([seq[:, :mid], extra, seq[:, mid:]], dim=1)  # (K, L + 1)


def with_token(order: ScanOrder, at: int) -> WithToken:
    return WithToken(order, at)


class IdentityOrder(ScanOrder):
    """One path, the sequence order itself (tokens that a tokenizer has already put in order)."""

    def __init__(self, length: int):
        super().__init__()
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"IdentityOrder: length must be an int >= 1, got {length!r}")
        self.n = length

    def _paths(self) -> torch.Tensor:
        return torch.arange(self.n)[None]  # (1, L)


ORDERS = {"raster": raster, "cross": cross_scan}


def grid_order(name: str, h: int, w: int) -> GridOrder:
    if name not in ORDERS:
        raise ValueError(f"unknown scan order {name!r}; choose one of {', '.join(ORDERS)}")
    return ORDERS[name](h, w)
