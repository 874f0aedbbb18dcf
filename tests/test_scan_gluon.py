"""WIP: the Gluon scan (ops/triton/scan_gluon.py) against the fp32 reference and the Triton lanes
scan, in the padded path's two forms. GPU only (Gluon has no interpreter)."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops.reference import selective_scan_ref
from mambakit.ops.triton.selective_scan import scan_fwd

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("emu", [0, 1, 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch,dim,length", [(2, 16, 64), (3, 48, 200), (4, 384, 4112)])
def test_gluon_scan_matches_reference_and_the_lanes_scan(reverse, batch, dim, length, emu):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mambakit.ops.triton.scan_gluon import gluon_scan
    g = torch.Generator().manual_seed(7 + reverse)
    bf, dev = torch.bfloat16, "cuda"
    u, z, add = (torch.randn(batch, dim, length, generator=g).to(dev, bf) for _ in range(3))
    delta = torch.nn.functional.softplus(torch.randn(batch, dim, length, generator=g) * 0.5 - 2).to(dev, bf)
    A = (-torch.rand(dim, 16, generator=g) - 0.2).to(dev)
    bc = torch.randn(batch, 32, length, generator=g).to(dev, bf)
    B, C = bc[:, :16], bc[:, 16:]
    D = torch.randn(dim, generator=g).to(dev)
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    f = lambda t: flip(t.float())  # noqa: E731
    plain = flip(selective_scan_ref(f(u), f(delta), A, f(B), f(C), D, None, None))
    if reverse:
        want = 0.5 * (plain + add.float()) * torch.nn.functional.silu(z.float())
        got = gluon_scan(u, delta, A, B, C, D, z=z, add=add, reverse=True, out_scale=0.5, emu=emu)
        lanes, _, _ = scan_fwd(u, delta, A, B, C, D, z, None, None, False, None, False, reverse=True, add=add,
                               out_scale=0.5, fixed_bc_stride=True)
    else:
        want = plain
        got = gluon_scan(u, delta, A, B, C, D, emu=emu)
        lanes, _, _ = scan_fwd(u, delta, A, B, C, D, None, None, None, False, None, False, fixed_bc_stride=True)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), lanes.float(), rtol=1e-2, atol=1e-2)
