"""The public ops behind Vision Mamba and the blocks: `add_rms_norm`, `patchify` and
`bimamba_inference`, each against its reference (reference.py), and each reference against an
independent composition: Block._pre, a strided Conv2d, and the bidirectional mixer's own
two-direction reference (BiMamba(fused=False))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit import ops
from mambakit.modules.bimamba import BiMamba, padded_weights
from mambakit.modules.block import Block
from mambakit.modules.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = ops.triton_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("first", [True, False])
def test_add_rms_norm_reference_is_block_pre(dtype, first):
    g = torch.Generator().manual_seed(int(first))
    norm = RMSNorm(24).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    block = Block(24, torch.nn.Identity(), norm, residual_in_fp32=True)
    hidden = torch.randn(3, 5, 24, generator=g).to(dtype)
    residual = None if first else torch.randn(3, 5, 24, generator=g).to(dtype)
    want_h, want_r = block._pre(hidden, residual)
    r_dtype = dtype if dtype == torch.float64 else torch.float32
    for backend in (None, "torch", "reference"):  # on CPU every backend is the reference
        got_h, got_r = ops.add_rms_norm(hidden, residual, norm.weight, norm.eps, r_dtype, backend=backend)
        torch.testing.assert_close(got_r, want_r, rtol=0, atol=0)
        torch.testing.assert_close(got_h, want_h, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_add_rms_norm_kernel_matches_its_reference():
    g = torch.Generator().manual_seed(5)
    hidden, residual = (torch.randn(4, 7, 40, generator=g).to(DEVICE) for _ in range(2))
    weight = torch.randn(40, generator=g).to(DEVICE)
    got = ops.add_rms_norm(hidden, residual, weight, 1e-5, torch.float32, torch.float16, backend="triton")
    want = ops.add_rms_norm_ref(hidden, residual, weight, 1e-5, torch.float32, torch.float16)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape,patch", [((2, 3, 32, 48), 16), ((1, 4, 12, 8), 4), ((2, 3, 9, 6), 3)])
def test_patchify_is_a_strided_conv_flattened(shape, patch):
    """Patch rows times the conv weight flattened in (channel, y, x) order is the strided Conv2d:
    the reference's order is the one PatchEmbed's GEMM needs."""
    g = torch.Generator().manual_seed(patch)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(5, shape[1], patch, patch, generator=g)
    rows = ops.patchify(x, patch)
    assert rows.shape == (shape[0], (shape[2] // patch) * (shape[3] // patch), shape[1] * patch * patch)
    conv = F.conv2d(x, weight, stride=patch).flatten(2).transpose(1, 2)  # (B, M, 5)
    torch.testing.assert_close(rows @ weight.reshape(5, -1).t(), conv, rtol=1e-5, atol=1e-5)
    assert ops.patchify(x, patch, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_patchify_kernel_matches_its_reference():
    x = torch.randn(2, 3, 32, 64, device=DEVICE)
    torch.testing.assert_close(ops.patchify(x, 16, backend="triton"), ops.patchify_ref(x, 16), rtol=0, atol=0)


def test_patchify_names_bad_arguments():
    with pytest.raises(ValueError, match="patch must be an int >= 1 dividing"):
        ops.patchify(torch.randn(1, 3, 10, 10), 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ops.patchify(torch.randn(3, 10, 10), 2)


def _bimamba(d_conv: int = 4, bias: bool = False) -> BiMamba:
    torch.manual_seed(0)
    bi = BiMamba(12, d_state=4, d_conv=d_conv, expand=2, bias=bias)
    with torch.no_grad():  # steps large enough that the state carries far
        bi.dt_proj.bias.add_(1.0)
        bi.dt_proj_b.bias.add_(1.0)
    return bi.to(DEVICE)


@pytest.mark.parametrize("length", [16, 11])
@pytest.mark.parametrize("d_conv,bias", [(4, False), (3, True)])
def test_bimamba_inference_reference_is_the_two_direction_mixer(length, d_conv, bias):
    """The op's reference, on rows padded to 16 steps with `length` true ones, equals the mixer's
    readable path (two explicit single-direction scans) on the true steps, and zeros after."""
    bi = _bimamba(d_conv, bias)
    h = torch.randn(2, 16, 12, device=DEVICE)
    with torch.no_grad():
        want = bi(h[:, :length], fused=False)
        got = ops.bimamba_inference(h, padded_weights(bi, torch.float32), length, backend="reference")
    torch.testing.assert_close(got[:, :length], want, rtol=1e-5, atol=1e-5)
    assert not got[:, length:].any()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("length", [32, 27])
@pytest.mark.parametrize("d_conv", [4, 3])
def test_bimamba_inference_kernels_match_the_reference(length, d_conv):
    bi = _bimamba(d_conv)
    h = torch.randn(2, 32, 12, device=DEVICE)
    w = padded_weights(bi, torch.float32)
    with torch.no_grad():
        got = ops.bimamba_inference(h, w, length, backend="triton")
        want = ops.bimamba_inference_ref(h, w, length)
    torch.testing.assert_close(got[:, :length], want[:, :length], rtol=2e-4, atol=2e-4)


def test_bimamba_inference_names_bad_arguments():
    w = padded_weights(_bimamba(), torch.float32)
    with pytest.raises(ValueError, match="length 17 must be in"):
        ops.bimamba_inference(torch.randn(1, 16, 12, device=DEVICE), w, 17)
    with pytest.raises(ValueError, match="d_model 8"):
        ops.bimamba_inference(torch.randn(1, 16, 8, device=DEVICE), w, 16)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="multiple of 16"):
            ops.bimamba_inference(torch.randn(1, 20, 12, device=DEVICE), w, 20, backend="triton")
