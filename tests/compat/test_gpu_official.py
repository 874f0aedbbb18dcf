"""mambakit.compat against the official packages on a CUDA device, where they are installed
(run with the device tool: `python -m pytest -m gpu tests/compat`), at the shapes and tolerances
of the official test suites (mamba_ssm tests/ops/triton/test_selective_state_update.py and
test_ssd.py, causal_conv1d tests/test_causal_conv1d.py), each official kernel run on a copy of
the same inputs."""

import pytest
import torch
import torch.nn.functional as F

from mambakit import compat

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _official_state_update():
    return pytest.importorskip("mamba_ssm.ops.triton.selective_state_update").selective_state_update


def _tolerance(itype, fp32, half, bf16):
    return {torch.float32: fp32, torch.float16: half, torch.bfloat16: bf16}[itype]


@pytest.mark.parametrize("itype", DTYPES)
@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("dstate", [16, 64])
@pytest.mark.parametrize("dim", [2048 + 16, 4096])
@pytest.mark.parametrize("with_indices", [False, True])
def test_mamba1_state_update_matches_official(dim, dstate, has_z, itype, with_indices):
    official = _official_state_update()
    rtol, atol = _tolerance(itype, (3e-4, 1e-3), (5e-3, 1e-2), (6e-2, 6e-2) if with_indices else (1e-2, 5e-2))
    torch.manual_seed(0)
    batch, dev = (16 if with_indices else 2), "cuda"
    rows = 10 * batch if with_indices else batch
    state = torch.randn(rows, dim, dstate, dtype=itype, device=dev)
    indices = torch.randperm(rows)[:batch].to(torch.int32).to(dev) if with_indices else None
    x, dt = torch.randn(batch, dim, device=dev, dtype=itype), torch.randn(batch, dim, device=dev, dtype=itype)
    dt_bias, A = torch.rand(dim, device=dev) - 4.0, -torch.rand(dim, dstate, device=dev) - 1.0
    B, C, D = torch.randn(batch, dstate, device=dev), torch.randn(batch, dstate, device=dev), torch.randn(dim, device=dev)
    z = torch.randn_like(x) if has_z else None
    state_ref = state.clone()
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, state_batch_indices=indices)
    out = compat.selective_state_update(state, x, dt, A, B, C, **kw)
    out_ref = official(state_ref, x, dt, A, B, C, **kw)
    torch.testing.assert_close(state, state_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("itype", DTYPES)
@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("tie_hdim", [False, True])
@pytest.mark.parametrize("ngroups", [1, 4])
@pytest.mark.parametrize("dstate", [16, 64])
@pytest.mark.parametrize("dim", [2048])
@pytest.mark.parametrize("with_indices", [False, True])
def test_headed_state_update_matches_official(dim, dstate, ngroups, tie_hdim, has_z, itype, with_indices):
    official = _official_state_update()
    bf16 = (1e-1, 1e-1) if with_indices else (1e-2, 1e-1)
    rtol, atol = _tolerance(itype, (3e-4, 1e-3), (5e-3, 3e-2), bf16)
    torch.manual_seed(0)
    batch, headdim, dev = (16 if with_indices else 2), 64, "cuda"
    heads = dim // headdim
    rows = 10 * batch if with_indices else batch
    state = torch.randn(rows, heads, headdim, dstate, dtype=itype, device=dev)
    indices = torch.randperm(rows)[:batch].to(torch.int32).to(dev) if with_indices else None
    x = torch.randn(batch, heads, headdim, device=dev, dtype=itype)
    if tie_hdim:  # per-head values broadcast with stride 0, as Mamba2 passes them
        dt = torch.randn(batch, heads, 1, device=dev, dtype=itype).expand(-1, -1, headdim)
        dt_bias = (torch.rand(heads, 1, device=dev) - 4.0).expand(-1, headdim)
        A = (-torch.rand(heads, 1, 1, device=dev) - 1.0).expand(-1, headdim, dstate)
        D = torch.randn(heads, 1, device=dev).expand(-1, headdim)
    else:
        dt = torch.randn(batch, heads, headdim, device=dev, dtype=itype)
        dt_bias, D = torch.rand(heads, headdim, device=dev) - 4.0, torch.randn(heads, headdim, device=dev)
        A = -torch.rand(heads, headdim, dstate, device=dev) - 1.0
    B, C = torch.randn(batch, ngroups, dstate, device=dev), torch.randn(batch, ngroups, dstate, device=dev)
    z = torch.randn_like(x) if has_z else None
    state_ref = state.clone()
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True, state_batch_indices=indices)
    out = compat.selective_state_update(state, x, dt, A, B, C, **kw)
    out_ref = official(state_ref, x, dt, A, B, C, **kw)
    torch.testing.assert_close(state, state_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("itype", DTYPES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("has_cache_seqlens", [False, True])
@pytest.mark.parametrize("seqlen", [1, 5])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("dim", [2048 + 16])
@pytest.mark.parametrize("gather", [False, True])
def test_conv_update_matches_official(dim, width, seqlen, has_cache_seqlens, has_bias, silu, itype, gather):
    official = pytest.importorskip("causal_conv1d").causal_conv1d_update
    rtol, atol = _tolerance(itype, (3e-4, 1e-3), (3e-3, 5e-3), (1e-2, 5e-2))
    torch.manual_seed(0)
    batch, dev = 64, "cuda"
    x = torch.randn(batch, seqlen, dim, device=dev, dtype=itype).transpose(-1, -2)  # channels last, as officially
    state_len = torch.randint(width - 1, width + 10, (1,)).item()
    rows = 10 * batch if gather else batch
    conv_state = torch.randn(rows, state_len, dim, device=dev, dtype=itype).transpose(-1, -2)
    indices = torch.randperm(rows)[:batch].to(torch.int32).to(dev) if gather else None
    if gather:
        indices[::5] = -1  # padding rows
    weight = torch.randn(dim, width, device=dev)
    bias = torch.randn(dim, device=dev) if has_bias else None
    lens = torch.randint(0, 1024, (batch,), dtype=torch.int32, device=dev) if has_cache_seqlens else None
    state_ref = conv_state.clone()
    kw = dict(activation="silu" if silu else None, cache_seqlens=lens, conv_state_indices=indices)
    out = compat.causal_conv1d_update(x, conv_state, weight, bias, **kw)
    out_ref = official(x, state_ref, weight, bias, **kw)
    assert torch.equal(conv_state, state_ref)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("itype", DTYPES)
@pytest.mark.parametrize("silu", [False, True])
def test_conv_with_seq_idx_matches_official(itype, silu):
    official = pytest.importorskip("causal_conv1d").causal_conv1d_fn
    torch.manual_seed(0)
    dev, dim, width = "cuda", 2048, 4
    lengths = [100, 1, 37, 250]
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None].to(dev)
    x = torch.randn(1, sum(lengths), dim, device=dev, dtype=itype).transpose(1, 2)  # channels last
    weight, bias = torch.randn(dim, width, device=dev, dtype=itype), torch.randn(dim, device=dev, dtype=itype)
    act = "silu" if silu else None
    out = compat.causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=act)
    out_ref = official(x, weight, bias, seq_idx=seq_idx, activation=act)
    rtol, atol = _tolerance(itype, (3e-4, 1e-3), (3e-3, 5e-3), (1e-2, 5e-2))
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ngroups", [1, 8])
def test_chunk_scan_with_seq_idx_matches_official(dtype, ngroups):
    official = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    torch.manual_seed(0)
    dev, heads, headdim, dstate, chunk = "cuda", 32, 64, 32, 64
    lengths = [130, 1, 64, 257]
    total = sum(lengths)
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None].to(dev)
    cu_seqlens = F.pad(torch.tensor(lengths, device=dev).cumsum(0), (1, 0)).to(torch.int32)
    x = torch.randn(1, total, heads, headdim, dtype=dtype, device=dev)
    dt = F.softplus(torch.randn(1, total, heads, device=dev) - 4)
    A = -0.1 * torch.rand(heads, device=dev)
    B = torch.randn(1, total, ngroups, dstate, dtype=dtype, device=dev) / 5
    C = torch.randn(1, total, ngroups, dstate, dtype=dtype, device=dev) / 5
    D = torch.randn(heads, device=dev)
    kw = dict(D=D, seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=True, return_varlen_states=True)
    out, final, varlen = compat.mamba_chunk_scan_combined(x, dt, A, B, C, chunk, **kw)
    out_ref, final_ref, varlen_ref = official(x, dt, A, B, C, chunk, **kw)
    rtol, atol = (1e-2, 3e-3) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(final.float(), final_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(varlen.float(), varlen_ref.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_split_conv1d_scan_matches_official(dtype, norm_before_gate):
    official = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined").mamba_split_conv1d_scan_combined
    torch.manual_seed(0)
    dev, batch, length, heads, headdim, ngroups, dstate, width = "cuda", 2, 300, 16, 64, 2, 64, 4
    dim = heads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    zxbcdt = torch.randn(batch, length, dim + conv_dim + heads, device=dev, dtype=dtype)
    conv_w = torch.randn(conv_dim, width, device=dev, dtype=dtype) * 0.3
    conv_b = torch.randn(conv_dim, device=dev, dtype=dtype)
    dt_bias, A, D = torch.rand(heads, device=dev) - 4.0, -torch.rand(heads, device=dev), torch.randn(heads, device=dev)
    kw = dict(rmsnorm_weight=torch.randn(dim, device=dev, dtype=dtype), rmsnorm_eps=1e-5, headdim=headdim,
              ngroups=ngroups, norm_before_gate=norm_before_gate, outproj_weight=torch.randn(256, dim, device=dev,
                                                                                             dtype=dtype) / 32)
    out = compat.mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, 64, **kw)
    out_ref = official(zxbcdt, conv_w, conv_b, dt_bias, A, D, 64, **kw)
    if dtype == torch.float32:  # the official kernels multiply fp32 in tf32, ours in full fp32: both against fp64
        want = compat.mamba_split_conv1d_scan_combined(
            zxbcdt.double(), conv_w.double(), conv_b.double(), dt_bias.double(), A.double(), D.double(), 64,
            **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        ours, theirs = ((t.double() - want).abs().max().item() for t in (out, out_ref))
        assert ours <= max(1.5 * theirs, 1e-5 * want.abs().max().item()), (ours, theirs)
    else:
        torch.testing.assert_close(out.float(), out_ref.float(), rtol=5e-2, atol=1e-1)
