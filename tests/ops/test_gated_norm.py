"""Mamba-2's gated, grouped RMSNorm: the Triton kernels (interpreted on CPU, compiled on the GPU)
against `gated_rms_norm_ref` — output and the gradients of x, z and the weight, both gate
orders, one or several groups, with and without z — and the argument checks."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mambakit import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(fn, x, z, w, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (x, z, w) if t is not None]
    xx, zz, ww = (leaves[0], leaves[1], leaves[2]) if z is not None else (leaves[0], None, leaves[1])
    y = fn(xx, zz, ww, 1e-5, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device)
    return (y.double(), *torch.autograd.grad((y.double() * gy).sum(), leaves))


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("dim,group_size", [(48, 48), (48, 16), (40, 10)])
def test_triton_gated_norm_matches_reference(norm_before_gate, with_z, dim, group_size):
    g = torch.Generator().manual_seed(dim + group_size)
    x = torch.randn(3, 5, dim, generator=g, dtype=torch.float64)
    z = torch.randn(3, 5, dim, generator=g, dtype=torch.float64) if with_z else None
    w = 1 + 0.1 * torch.randn(dim, generator=g, dtype=torch.float64)
    want = _grads(ops.gated_rms_norm_ref, x, z, w, group_size=group_size, norm_before_gate=norm_before_gate)
    to = lambda t: t.float().to(DEVICE) if t is not None else None  # noqa: E731
    got = _grads(ops.gated_rms_norm, to(x), to(z), to(w), group_size=group_size, norm_before_gate=norm_before_gate,
                 backend="triton")
    for name, a, b in zip(["y", "dx", "dz", "dw"] if with_z else ["y", "dx", "dw"], got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_the_mixer_norm_runs_through_the_op():
    from mambakit.modules.norm import GatedRMSNorm
    norm = GatedRMSNorm(32, group_size=8)
    x, z = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(norm(x, z), ops.gated_rms_norm_ref(x, z, norm.weight, norm.eps, 8))


@pytest.mark.parametrize("kw,match", [(dict(group_size=5), "group_size"), (dict(z=torch.ones(2, 3)), "z has shape"),
                                      (dict(weight=torch.ones(3)), "weight has shape")])
def test_bad_arguments_are_named(kw, match):
    args = dict(x=torch.ones(2, 8), z=None, weight=torch.ones(8), eps=1e-5, group_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ops.gated_rms_norm(**args)
