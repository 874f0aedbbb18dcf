"""Space-filling curves over 3-D integer grids: the Hilbert curve and the Z-order (Morton) curve.

`hilbert_index(q, bits)` / `morton_index(q, bits)` map integer coordinates q (..., 3) in
[0, 2^bits) to their position along the curve (int64, a bijection onto [0, 2^(3*bits))).
Sorting points by it makes a 1-D order in which points close along the curve are close in
space; the Hilbert curve moves to an adjacent cell at every step, the Z-order curve jumps
between octants. `curve_order(xyz, bits, curve)` quantizes each cloud in its own bounding box
and returns the sorting permutation."""

from __future__ import annotations

import torch

CURVES = ("hilbert", "z")


def _check(q: torch.Tensor, bits: int) -> None:
    if q.shape[-1] != 3 or q.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expected integer coordinates (..., 3), got {tuple(q.shape)} {q.dtype}")
    if not 1 <= bits <= 20:
        raise ValueError(f"bits must be in 1..20 (the index has 3*bits bits), got {bits}")


def morton_index(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 3) ints in [0, 2^bits) -> (...,) the Z-order index: bit b of axis i goes to bit
    3*b + (2 - i), so x is the most significant axis at every level."""
    _check(q, bits)
    q = q.long()
    code = torch.zeros(q.shape[:-1], dtype=torch.long, device=q.device)
    for b in range(bits):
        for i in range(3):
            code |= ((q[..., i] >> b) & 1) << (3 * b + 2 - i)
    return code


def hilbert_index(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 3) ints in [0, 2^bits) -> (...,) the Hilbert index, by Skilling's transform
    ("Programming the Hilbert curve", AIP Conf. Proc. 707, 2004): undo the excess work of the
    axes, Gray-encode them, then interleave their bits as the Z-order does."""
    _check(q, bits)
    x = [q[..., i].long().clone() for i in range(3)]
    m = 1 << (bits - 1)
    bit = m
    while bit > 1:  # inverse undo: from the top bit down
        mask = bit - 1
        for i in range(3):
            hit = (x[i] & bit) != 0
            swap = (x[0] ^ x[i]) & mask  # exchange the low bits of x[0] and x[i] where bit i is clear
            x0_new = torch.where(hit, x[0] ^ mask, x[0] ^ swap)
            if i:
                x[i] = torch.where(hit, x[i], x[i] ^ swap)
            x[0] = x0_new
        bit >>= 1
    for i in range(1, 3):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    bit = m
    while bit > 1:
        t = torch.where((x[2] & bit) != 0, t ^ (bit - 1), t)
        bit >>= 1
    x = [xi ^ t for xi in x]
    return morton_index(torch.stack(x, dim=-1), bits)  # the transposed index, bits interleaved


def quantize(xyz: torch.Tensor, bits: int) -> torch.Tensor:
    """(B, G, 3) floats -> (B, G, 3) ints in [0, 2^bits): each cloud scaled by the longest
    side of its own bounding box (so the aspect ratio is kept)."""
    lo = xyz.amin(dim=1, keepdim=True)  # (B, 1, 3)
    span = (xyz.amax(dim=1, keepdim=True) - lo).amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, 1, 1)
    cells = 1 << bits
    return ((xyz - lo) / span * cells).long().clamp(0, cells - 1)


def curve_order(xyz: torch.Tensor, bits: int = 10, curve: str = "hilbert") -> torch.Tensor:
    """(B, G, 3) points -> (B, G) int64 permutation sorting each cloud along the curve (ties,
    points in one cell, keep their input order)."""
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"expected points (B, G, 3), got {tuple(xyz.shape)}")
    q = quantize(xyz.detach(), bits)
    code = hilbert_index(q, bits) if curve == "hilbert" else morton_index(q, bits)  # (B, G)
    return torch.sort(code, dim=1, stable=True).indices
