"""Scan orders, space-filling curves, farthest-point sampling and the video / point tokenizers."""

import itertools

import numpy as np
import pytest
import torch

from mambakit.models.point_tokenizer import (PointTokenizer, PointTokenizerConfig, farthest_point_sample,
                                             gather_points, knn_group)
from mambakit.models.scan_orders import GridOrder, IdentityOrder, cross_scan, raster, with_token
from mambakit.models.space_filling import curve_order, hilbert_index, morton_index
from mambakit.models.video_tokenizer import TubeletConfig, TubeletTokenizer


def _is_permutation(p: torch.Tensor) -> bool:
    return bool((p.sort(dim=-1).values == torch.arange(p.shape[-1])).all())


# -- grid orders -------------------------------------------------------------------------------

def test_raster_is_identity_and_cross_scan_visits_columns():
    h, w = 3, 5
    assert raster(h, w).is_identity()
    order = cross_scan(h, w)
    paths = order.paths()
    assert paths.shape == (2, h * w)
    coords = [(i // w, i % w) for i in range(h * w)]  # raster index -> (row, col)
    visited = [coords[i] for i in paths[1].tolist()]
    assert visited == [(r, c) for c in range(w) for r in range(h)]  # column-major, independently enumerated
    dirs = order.directions()
    assert dirs.shape == (4, h * w)
    assert [coords[i] for i in dirs[2].tolist()] == [(r, c) for r in reversed(range(h)) for c in reversed(range(w))]
    assert all(_is_permutation(d) for d in dirs)


@pytest.mark.parametrize("order", [cross_scan(4, 6), GridOrder((2, 3, 4), [(0, 1, 2), (1, 2, 0), (2, 0, 1)]),
                                   with_token(cross_scan(3, 4), 6), with_token(raster(5, 5), 12)])
def test_scan_then_unscan_restores_the_sequence(order):
    x = torch.randn(2, order.length, 3)
    for k in range(order.num_paths):
        assert _is_permutation(order.paths()[k])
        scanned = order.scan(x, k)
        assert torch.equal(scanned[:, 0], x[:, order.paths()[k, 0]])
        assert torch.equal(order.unscan(scanned, k), x)


def test_with_token_puts_the_token_mid_path_and_keeps_raster_identity():
    m = 16
    order = with_token(raster(4, 4), m // 2)
    assert order.is_identity()  # Vim's layout: raster with the class token at the middle
    cross = with_token(cross_scan(4, 4), m // 2)
    for path in cross.paths():
        assert path[m // 2] == m // 2  # the class token's sequence position, visited mid-path
        assert _is_permutation(path)


def test_grid_order_bad_input():
    with pytest.raises(ValueError, match="permutation of the axes"):
        GridOrder((2, 3), [(0, 0)])
    with pytest.raises(ValueError, match="positive ints"):
        GridOrder((2, 0), [(0, 1)])
    with pytest.raises(ValueError, match="expected"):
        raster(2, 2).scan(torch.zeros(1, 5, 3), 0)
    with pytest.raises(ValueError):
        IdentityOrder(0)


# -- video tubelets ---------------------------------------------------------------------------

def test_tubelet_tokens_follow_their_grid_order():
    cfg = TubeletConfig(frames=4, img_size=8, tubelet=2, patch_size=4, in_chans=2, dim=6)
    tok = TubeletTokenizer(cfg)
    video = torch.randn(2, 2, 4, 8, 8)
    tokens, pos = tok(video)
    t, h, w = cfg.grid
    assert tokens.shape == (2, t * h * w, 6) and pos.shape == (1, t * h * w, 6)
    # token (ti, hi, wi) is the conv of exactly its tubelet: check one against a direct computation
    ti, hi, wi = 1, 0, 1
    cube = video[:, :, 2 * ti:2 * ti + 2, 4 * hi:4 * hi + 4, 4 * wi:4 * wi + 4]  # (B, C, 2, 4, 4)
    direct = torch.einsum("bcthw,dcthw->bd", cube, tok.proj.weight) + tok.proj.bias
    torch.testing.assert_close(tokens[:, (ti * h + hi) * w + wi], direct, rtol=1e-5, atol=1e-5)
    for axes in ((0, 1, 2), (1, 2, 0)):
        order = tok.order(axes)
        assert _is_permutation(order.paths()[0])
        assert torch.equal(order.unscan(order.scan(tokens, 0), 0), tokens)
    time_first = tok.order((1, 2, 0)).paths()[0]
    assert time_first[:t].tolist() == [s * h * w for s in range(t)]  # patch (0, 0) through time first
    with pytest.raises(ValueError, match="expected video"):
        tok(torch.randn(2, 2, 4, 8, 9))
    with pytest.raises(ValueError, match="divisible"):
        TubeletConfig(frames=5, tubelet=2).check()


# -- farthest-point sampling, kNN ------------------------------------------------------------

def _fps_numpy(points: np.ndarray, n: int) -> list[int]:
    """The textbook greedy loop, one point at a time."""
    chosen = [0]
    while len(chosen) < n:
        best, best_d = None, -1.0
        for i, p in enumerate(points):
            d = min(float(((p - points[j]) ** 2).sum()) for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_fps_matches_the_greedy_definition_and_is_deterministic():
    xyz = torch.rand(3, 60, 3, dtype=torch.float64)
    idx = farthest_point_sample(xyz, 12)
    assert idx.shape == (3, 12)
    for b in range(3):
        assert len(set(idx[b].tolist())) == 12  # distinct
        assert idx[b].tolist() == _fps_numpy(xyz[b].numpy(), 12)
    assert torch.equal(idx, farthest_point_sample(xyz.clone(), 12))
    with pytest.raises(ValueError, match="cannot sample"):
        farthest_point_sample(xyz, 61)


def test_knn_group_returns_the_nearest_points():
    xyz = torch.rand(2, 40, 3, dtype=torch.float64)
    centres = xyz[:, :5]
    idx = knn_group(xyz, centres, 7)  # (B, G, k)
    for b, g in itertools.product(range(2), range(5)):
        d = ((xyz[b] - centres[b, g]) ** 2).sum(-1)
        assert set(idx[b, g].tolist()) == set(d.argsort()[:7].tolist())
        assert idx[b, g, 0] == g  # a centre is its own nearest point
    assert torch.equal(gather_points(xyz, idx)[1, 2, 3], xyz[1, idx[1, 2, 3]])


# -- space-filling curves ------------------------------------------------------------------------

def _full_grid(bits):
    side = 1 << bits
    return torch.tensor(list(itertools.product(range(side), repeat=3)))  # (side^3, 3)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_hilbert_is_a_bijection_whose_steps_are_unit_moves(bits):
    q = _full_grid(bits)
    h = hilbert_index(q, bits)
    assert sorted(h.tolist()) == list(range(len(q)))
    walk = q[h.argsort()]  # cells in curve order
    assert ((walk[1:] - walk[:-1]).abs().sum(-1) == 1).all()  # every step goes to a face neighbour


def test_morton_is_a_bijection_and_keeps_octants_contiguous():
    bits = 3
    q = _full_grid(bits)
    z = morton_index(q, bits)
    assert sorted(z.tolist()) == list(range(len(q)))
    octant = (q >> (bits - 1)) @ torch.tensor([4, 2, 1])  # the top-level octant of each cell
    assert torch.equal(octant, z >> (3 * (bits - 1)))  # octants are contiguous runs of the curve


@pytest.mark.parametrize("curve", ["hilbert", "z"])
def test_curve_order_puts_nearby_points_nearby(curve):
    gen = torch.Generator().manual_seed(0)
    xyz = torch.rand(4, 512, 3, generator=gen)
    perm = curve_order(xyz, bits=6, curve=curve)  # (B, G)
    assert all(_is_permutation(p) for p in perm)
    walk = gather_points(xyz, perm)
    step = (walk[:, 1:] - walk[:, :-1]).norm(dim=-1).mean()
    shuffled = xyz[:, torch.randperm(512, generator=gen)]
    random_step = (shuffled[:, 1:] - shuffled[:, :-1]).norm(dim=-1).mean()
    assert step < 0.25 * random_step
    # and neighbours along the curve are mostly spatial neighbours: the next point along the
    # curve is among the 16 nearest points more often than not
    d = torch.cdist(walk, walk)  # (B, G, G)
    rank = (d[:, :-1] < d[:, :-1].gather(2, torch.arange(1, 512).view(1, -1, 1).expand(4, -1, 1))).sum(-1)
    assert (rank <= 16).float().mean() > 0.5


# -- the point tokenizer ----------------------------------------------------------------------

def test_point_tokenizer_groups_in_curve_order_and_order_inverts():
    cfg = PointTokenizerConfig(dim=16, num_groups=10, group_size=6, hidden=8)
    tok = PointTokenizer(cfg)
    xyz = torch.randn(2, 50, 3, requires_grad=True)
    out = tok(xyz)
    assert out["tokens"].shape == (2, 10, 16) and out["pos"].shape == (2, 10, 16)
    order = out["order"]
    assert all(_is_permutation(o) for o in order)
    fps_centres = gather_points(xyz.detach(), farthest_point_sample(xyz, 10))  # FPS order
    assert torch.equal(gather_points(fps_centres, order), out["centres"].detach())
    inverse = order.argsort(dim=1)
    assert torch.equal(gather_points(out["centres"].detach(), inverse), fps_centres)  # the inverse restores FPS order
    assert torch.equal(out["order"], curve_order(fps_centres, cfg.bits, cfg.curve))
    # the tokens do not depend on the order of the points (FPS starts at point 0, so keep it first)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(49)])
    out2 = tok(xyz.detach()[:, perm])
    torch.testing.assert_close(out2["tokens"], out["tokens"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2["centres"], out["centres"].detach())
    (out["tokens"].sum() + out["pos"].sum()).backward()
    assert xyz.grad is not None and torch.isfinite(xyz.grad).all()
    with pytest.raises(ValueError, match="expected points"):
        tok(torch.randn(2, 50, 2))
    with pytest.raises(ValueError, match="curve"):
        PointTokenizerConfig(curve="peano").check()
