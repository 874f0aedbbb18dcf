"""The fused Triton decoding kernels (ops/triton/step.py) against the reference step updates:
outputs and the in-place state, with groups, without optionals, and conv widths 1..4. On a
machine without CUDA they run under TRITON_INTERPRET=1."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mambakit.ops import (causal_conv1d_update, causal_conv1d_update_ref, selective_state_update,  # noqa: E402
                          selective_state_update_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


def _rand(*shape, g, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEVICE)


@pytest.mark.parametrize("batch,dim,d_state,groups,optionals", [
    (2, 8, 4, None, True), (3, 12, 16, 3, True), (1, 5, 3, None, False), (2, 16, 64, 2, True)])
def test_state_update_matches_reference(batch, dim, d_state, groups, optionals):
    g = torch.Generator().manual_seed(dim + d_state)
    bc = (batch, groups, d_state) if groups else (batch, d_state)
    state = _rand(batch, dim, d_state, g=g)
    args = dict(x=_rand(batch, dim, g=g), dt=_rand(batch, dim, g=g, scale=0.5, shift=-1.0),
                A=-_rand(dim, d_state, g=g).abs() - 0.1, B=_rand(*bc, g=g), C=_rand(*bc, g=g))
    if optionals:
        args.update(D=_rand(dim, g=g), z=_rand(batch, dim, g=g), dt_bias=_rand(dim, g=g, scale=0.3))
    y_ref, state_ref = selective_state_update_ref(state.clone(), **args, dt_softplus=optionals)
    y = selective_state_update(state, **args, dt_softplus=optionals, backend="triton")
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)  # updated in place


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
def test_conv_update_matches_reference(width, bias, activation):
    g = torch.Generator().manual_seed(width)
    batch, dim = 3, 10
    state = _rand(batch, dim, width - 1, g=g)
    x, w = _rand(batch, dim, g=g), _rand(dim, width, g=g)
    b = _rand(dim, g=g) if bias else None
    y_ref, state_ref = causal_conv1d_update_ref(x, state.clone(), w, b, activation)
    y = causal_conv1d_update(x, state, w, b, activation, backend="triton")
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)


def test_mixer_step_with_fused_kernels_matches_forward():
    """Mamba.step through the fused kernels (ops.selective_state_update_ / causal_conv1d_update_
    pick them on CUDA; here they are called through backend='triton' by patching the picker)."""
    from mambakit.modules.mamba import Mamba
    from mambakit.ops import backend
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=8).to(DEVICE).eval()
    x = torch.randn(2, 7, 16, device=DEVICE)
    with torch.no_grad():
        full = mixer(x)
        cache = mixer.allocate_state(2)
        orig = backend.fused_kernels_for
        backend.fused_kernels_for = lambda t: True
        try:
            steps = torch.stack([mixer.step(x[:, t], cache) for t in range(7)], dim=1)
        finally:
            backend.fused_kernels_for = orig
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_equals_block_pre(residual_in_fp32, first, dtype):
    """The fused residual add + RMSNorm of a decoding step gives _pre's outputs, roundings included.
    (bf16 runs on the GPU only: the interpreter rounds fp32 -> bf16 toward zero, not to nearest.)"""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter's bf16 rounding differs from the GPU's")
    from mambakit.modules.block import Block
    from mambakit.modules.norm import RMSNorm
    from mambakit.ops import add_rms_norm
    g = torch.Generator().manual_seed(int(first) + 2 * int(residual_in_fp32))
    dim = 48
    norm = RMSNorm(dim).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
    block = Block(dim, torch.nn.Identity(), norm, residual_in_fp32=residual_in_fp32)
    hidden = _rand(3, dim, g=g).to(dtype)
    residual = None if first else _rand(3, dim, g=g).to(torch.float32 if residual_in_fp32 else dtype)
    want_h, want_r = block._pre(hidden, residual)
    r_dtype = torch.float32 if residual_in_fp32 else dtype
    got_h, got_r = add_rms_norm(hidden, residual, norm.weight, norm.eps, r_dtype, backend="triton")
    assert got_r.dtype == want_r.dtype and got_h.dtype == want_h.dtype
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=0)
    torch.testing.assert_close(got_h.float(), want_h.float(), rtol=1e-6 if dtype == torch.float32 else 8e-3,
                               atol=1e-6 if dtype == torch.float32 else 8e-3)


def test_fused_add_rms_norm_over_encoder_rows():
    """Over an encoder's (B, L, dim) rows (many rows per program, a strided view of padded rows)
    with the normed output written in autocast's dtype: _pre's values rounded once to it."""
    from mambakit.modules.block import Block
    from mambakit.modules.norm import RMSNorm
    from mambakit.ops import add_rms_norm
    g = torch.Generator().manual_seed(3)
    dim = 48
    norm = RMSNorm(dim).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
    block = Block(dim, torch.nn.Identity(), norm, residual_in_fp32=True)
    hidden = _rand(2, 640, dim, g=g)[:, :600]  # 1200 rows, row stride of the padded 640
    residual = _rand(2, 600, dim, g=g)
    want_h, want_r = block._pre(hidden, residual)
    got_h, got_r = add_rms_norm(hidden, residual, norm.weight, norm.eps, torch.float32, torch.float16,
                                backend="triton")
    assert got_h.dtype == torch.float16 and got_h.shape == (2, 600, dim) and got_r.shape == (2, 600, dim)
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=0)
    torch.testing.assert_close(got_h, want_h.to(torch.float16), rtol=1e-3, atol=1e-3)
    assert (got_h.float() - want_h).abs().max() < 2e-3 * want_h.abs().max()


def test_state_update_with_dt_proj_folded_in():
    """Δ computed in the kernel from the low-rank input and dt_proj's weight equals the linear
    layer followed by the update."""
    g = torch.Generator().manual_seed(7)
    batch, dim, d_state, rank = 2, 12, 8, 5
    state = _rand(batch, dim, d_state, g=g)
    w, bias, dt_r = _rand(dim, rank, g=g, scale=0.4), _rand(dim, g=g, scale=0.3, shift=-1.0), _rand(batch, rank, g=g)
    args = dict(x=_rand(batch, dim, g=g), A=-_rand(dim, d_state, g=g).abs() - 0.1, B=_rand(batch, d_state, g=g),
                C=_rand(batch, d_state, g=g), D=_rand(dim, g=g), z=_rand(batch, dim, g=g))
    dt = torch.nn.functional.linear(dt_r, w, bias)
    y_ref, state_ref = selective_state_update_ref(state.clone(), dt=dt, **args, dt_softplus=True)
    from mambakit.ops.triton.step import state_update_
    y = state_update_(state, args["x"], dt_r, args["A"], args["B"], args["C"], args["D"], args["z"], bias, True,
                      dt_weight=w)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)


def test_state_update_with_A_formed_from_A_log():
    """The mixer's step passes A_log; the kernel forms A = -exp(A_log) and must equal the update
    given A itself (the reference)."""
    g = torch.Generator().manual_seed(8)
    batch, dim, d_state = 2, 8, 4
    state = _rand(batch, dim, d_state, g=g)
    A_log = _rand(dim, d_state, g=g, scale=0.5)
    args = dict(x=_rand(batch, dim, g=g), dt=_rand(batch, dim, g=g, scale=0.3, shift=-1.0), B=_rand(batch, d_state, g=g),
                C=_rand(batch, d_state, g=g), D=_rand(dim, g=g), z=_rand(batch, dim, g=g))
    y_ref, state_ref = selective_state_update_ref(state.clone(), A=-torch.exp(A_log), **args, dt_softplus=True)
    from mambakit.ops.triton.step import state_update_
    y = state_update_(state, args["x"], args["dt"], A_log, args["B"], args["C"], args["D"], args["z"], None, True,
                      a_is_log=True)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, state_ref, **TOL)
