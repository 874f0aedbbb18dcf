"""Random inputs for the selective scan, shared by the scan tests."""

from __future__ import annotations

import torch


def make_scan_inputs(batch, dim, length, d_state, groups=None, dtype=torch.float32, *, with_D=True, with_z=True,
                     with_bias=True, with_init=False, n_seqs=None, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    bc_shape = (batch, groups, d_state, length) if groups else (batch, d_state, length)
    kw = dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5, shift=-1.0),
        A=-(torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 2 + 0.1).to(dtype),
        B=rnd(*bc_shape), C=rnd(*bc_shape),
        D=rnd(dim) if with_D else None,
        z=rnd(batch, dim, length) if with_z else None,
        delta_bias=rnd(dim, scale=0.3) if with_bias else None,
        initial_state=rnd(n_seqs or batch, dim, d_state) if with_init else None,
    )
    if requires_grad:
        kw = {k: (v.requires_grad_() if v is not None else None) for k, v in kw.items()}
    return kw


def count_held(fn, shape) -> int:
    """How many tensors of `shape` autograd holds for the backward while `fn()` runs its forward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes.count(tuple(shape))


def padded_scan_ref(u, delta, A, B, C, D, z=None, add=None, reverse=False, out_scale=1.0):
    """What the padded path's scans compute, in fp32 from the same (bf16) inputs: the forward scan
    of u, or the reversed scan (the causal reference on flipped steps, flipped back), then
    out_scale * (y + add) * silu(z) where add and z are given."""
    from mambakit.ops.reference import selective_scan_ref
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    f = lambda t: flip(t.float())  # noqa: E731
    y = flip(selective_scan_ref(f(u), f(delta), A, f(B), f(C), D, None, None))
    if add is not None:
        y = y + add.float()
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return out_scale * y
