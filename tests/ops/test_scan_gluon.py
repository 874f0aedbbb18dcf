"""The Gluon scan (ops/triton/scan_gluon.py) against the fp32 reference and the Triton lanes scan,
in the padded path's two forms (in place, as the path calls it), and the padded path's choice of
it. The kernel runs on CUDA only (Gluon has no interpreter); its input checks run on CPU."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import knobs
from mambakit.ops.triton.scan_launch import scan_inference
from tests.scan_inputs import padded_scan_ref

pytest.importorskip("triton.experimental.gluon")
from mambakit.ops.triton.scan_gluon import gluon_fits, gluon_scan  # noqa: E402

CUDA = torch.cuda.is_available()


def _inputs(batch, dim, length, device, seed=7):
    """bf16 u, z, add, delta (B, D, L); fp32 A (D, 16), D (D,); B and C (B, 16, L) rows of one buffer."""
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    u, z, add = (torch.randn(batch, dim, length, generator=g).to(device, bf) for _ in range(3))
    delta = torch.nn.functional.softplus(torch.randn(batch, dim, length, generator=g) * 0.5 - 2).to(device, bf)
    A = (-torch.rand(dim, 16, generator=g) - 0.2).to(device)
    bc = torch.randn(batch, 32, length, generator=g).to(device, bf)
    D = torch.randn(dim, generator=g).to(device)
    return u, z, add, delta, A, bc[:, :16], bc[:, 16:], D


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch,dim,length", [(2, 16, 8), (2, 16, 64), (3, 48, 200), (4, 384, 4112)])
def test_gluon_scan_matches_reference_and_the_lanes_scan(reverse, prefetch, batch, dim, length):
    """Forward: y = scan(u) written over u. Reversed: y = 0.5 (scan_reversed(u) + add) silu(z)
    written over add. Both against the fp32 reference and the lanes scan."""
    u, z, add, delta, A, B, C, D = _inputs(batch, dim, length, "cuda", seed=7 + reverse)
    if reverse:
        want = padded_scan_ref(u, delta, A, B, C, D, z, add, reverse=True, out_scale=0.5)
        lanes, _ = scan_inference(u, delta, A, B, C, D, z, reverse=True, add=add, out_scale=0.5,
                                  fixed_bc_stride=True)
        got = add.clone()
        gluon_scan(u, delta, A, B, C, D, z=z, add=got, out=got, reverse=True, out_scale=0.5, prefetch=prefetch)
    else:
        want = padded_scan_ref(u, delta, A, B, C, D)
        lanes, _ = scan_inference(u, delta, A, B, C, D, fixed_bc_stride=True)
        got = u.clone()
        gluon_scan(got, delta, A, B, C, D, out=got, prefetch=prefetch)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), lanes.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_padded_path_runs_both_scans_on_gluon_and_equals_the_lanes_path(monkeypatch):
    """Vim's bf16 padded path (d_state 16) takes the Gluon kernel for both directions, and its
    output equals the same path on the Triton lanes kernel."""
    import mambakit.ops.vision as padded
    from mambakit.modules.bimamba import BiMamba
    torch.manual_seed(0)
    bi = BiMamba(192, d_state=16).cuda()
    h = torch.randn(4, 197, 192, device="cuda")
    calls = []
    fits, scan = padded._gluon()
    monkeypatch.setattr(padded, "_gluon", lambda: (fits, lambda *a, **k: calls.append(k.get("reverse", False))
                                                   or scan(*a, **k)))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = bi(h)
        assert calls == [False, True]
        monkeypatch.undo()
        with knobs.override(gluon_scan=False):  # MAMBAKIT_GLUON_SCAN=0
            lanes = bi(h)
        assert calls == [False, True]  # the lanes scan ran both directions
    torch.testing.assert_close(got.float(), lanes.float(), rtol=2e-2, atol=2e-2)


def test_gluon_scan_names_what_it_cannot_take():
    u, z, add, delta, A, B, C, D = _inputs(1, 16, 16, "cpu")
    assert not gluon_fits(u, delta, A, B, C, D)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        gluon_scan(u, delta, A, B, C, D)
    cases = [
        (dict(u=u.float()), "u must be bf16"),
        (dict(delta=delta[..., :8]), "delta must be"),
        (dict(z=z.transpose(1, 2).contiguous().transpose(1, 2)), "z must be .* unit stride"),
        (dict(A=A[:, :8].contiguous()), "d_state 16 only"),
        (dict(D=D.double()), "D must be contiguous fp32"),
        (dict(B=torch.randn(1, 40, 16).to(B.dtype)[:, 3:19]), "state stride Lp, unit stride along Lp and one batch"),
        (dict(C=C.transpose(1, 2).contiguous().transpose(1, 2)), "state stride Lp"),
        (dict(B=B[:, :8]), "B and C must be"),
    ]
    base = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=None, add=None, out=None)
    for change, message in cases:
        args = {**base, **change}
        with pytest.raises(ValueError, match=message):
            gluon_scan(**args)
    odd = _inputs(1, 24, 12, "cpu")
    with pytest.raises(ValueError, match="multiple of 16 and Lp of 8"):
        gluon_scan(odd[0], odd[3], odd[4], odd[5], odd[6], odd[7])
