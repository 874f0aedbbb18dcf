"""The Mamba-2 mixer against a composition written out from its definition (the SSD by the
sequential reference), its decoding step against the full forward, packed sequences against
separate runs, and its argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mambakit.modules.mamba2 import Mamba2
from mambakit.modules.norm import GatedRMSNorm
from mambakit.ops.reference import ssd_ref


def _mixer(seed: int = 0, dtype=torch.float64, **kw) -> Mamba2:
    torch.manual_seed(seed)
    defaults = dict(d_model=8, d_state=5, d_conv=3, expand=2, headdim=4, ngroups=2, chunk_size=4)
    m = Mamba2(**{**defaults, **kw}).to(dtype)
    with torch.no_grad():  # constants made random, so that a dropped term shows
        m.D.copy_(torch.randn_like(m.D))
        m.norm.weight.copy_(1 + 0.3 * torch.randn_like(m.norm.weight))
        m.conv1d.bias.copy_(0.3 * torch.randn_like(m.conv1d.bias))
    return m


def _written_out(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The mixer from its definition: every step spelled out, the SSD by the sequential spec."""
    batch, length, _ = u.shape
    zxbcdt = F.linear(u, m.in_proj.weight, m.in_proj.bias)
    z = zxbcdt[..., :m.d_inner]
    xbc = zxbcdt[..., m.d_inner:m.d_inner + m.conv_dim]
    dt = zxbcdt[..., m.d_inner + m.conv_dim:]
    xbc = F.conv1d(xbc.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.conv_dim)
    xbc = F.silu(xbc[..., :length]).transpose(1, 2)  # (B, L, conv_dim), causal
    gn = m.ngroups * m.d_state
    x, B, C = xbc[..., :m.d_inner], xbc[..., m.d_inner:m.d_inner + gn], xbc[..., m.d_inner + gn:]
    y = ssd_ref(x.reshape(batch, length, m.nheads, m.headdim), dt, -torch.exp(m.A_log.double()).to(u.dtype),
                B.reshape(batch, length, m.ngroups, m.d_state), C.reshape(batch, length, m.ngroups, m.d_state),
                D=m.D, dt_bias=m.dt_bias, dt_softplus=True, dt_limit=m.dt_limit)
    y = y.reshape(batch, length, m.d_inner) * F.silu(z)  # gate, then the grouped norm
    groups = y.unflatten(-1, (m.ngroups, -1))
    y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + m.norm.eps)).flatten(-2) * m.norm.weight
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("length", [1, 3, 4, 9])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_the_mixer_equals_its_definition(length, ngroups):
    m = _mixer(ngroups=ngroups)
    u = torch.randn(2, length, m.d_model, dtype=torch.float64)
    torch.testing.assert_close(m(u), _written_out(m, u), rtol=1e-9, atol=1e-10)


def test_prefill_then_steps_equal_the_full_forward():
    m = _mixer()
    u = torch.randn(3, 11, m.d_model, dtype=torch.float64)
    want = m(u)
    cache = m.allocate_state(3, dtype=torch.float64)
    got = [m(u[:, :6], cache=cache)]
    got += [m.step(u[:, t], cache)[:, None] for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-9, atol=1e-10)


def test_two_halves_through_the_state_equal_one_run_with_gradients():
    m = _mixer()
    u = torch.randn(2, 10, m.d_model, dtype=torch.float64, requires_grad=True)
    whole = m(u)
    first, state = m.forward_with_states(u[:, :4])
    second, _ = m.forward_with_states(u[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-9, atol=1e-10)
    g_whole = torch.autograd.grad(whole.square().sum(), [u, m.A_log, m.in_proj.weight])
    g_split = torch.autograd.grad(torch.cat([first, second], 1).square().sum(), [u, m.A_log, m.in_proj.weight])
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_packed_sequences_equal_separate_runs():
    m = _mixer()
    lengths = [3, 1, 6]
    seqs = [torch.randn(1, n, m.d_model, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    cache = m.allocate_state(3, dtype=torch.float64)
    packed = m(torch.cat(seqs, dim=1), cache=cache, cu_seqlens=cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone_cache = m.allocate_state(1, dtype=torch.float64)
        torch.testing.assert_close(packed[:, a:b], m(seqs[s], cache=alone_cache), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cache.ssm[s:s + 1], alone_cache.ssm, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cache.conv[s:s + 1], alone_cache.conv, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_in_groups(norm_before_gate):
    norm = GatedRMSNorm(12, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12))
    x, z = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    h = x if norm_before_gate else x * F.silu(z)
    g = h.unflatten(-1, (3, 4))
    want = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * norm.weight
    if norm_before_gate:
        want = want * F.silu(z)
    torch.testing.assert_close(norm(x, z), want, rtol=1e-12, atol=1e-12)


def test_a_wrapped_projection_is_called():
    m = _mixer()
    u = torch.randn(1, 5, m.d_model, dtype=torch.float64)
    scaled = copy.deepcopy(m)
    with torch.no_grad():
        scaled.out_proj.weight.mul_(2.0)
    m.out_proj.register_forward_hook(lambda mod, args, out: out * 2.0)
    torch.testing.assert_close(m(u), scaled(u))


@pytest.mark.parametrize("kwargs,name", [
    (dict(headdim=3), "headdim"),          # does not divide d_inner 16
    (dict(ngroups=3), "ngroups"),          # does not divide 4 heads
    (dict(d_state=257), "d_state"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(dt_limit=(0.5, 0.1)), "dt_limit"),
    (dict(A_init_range=(0.0, 1.0)), "A_init_range"),
])
def test_bad_geometry_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Mamba2(d_model=8, d_state=kwargs.pop("d_state", 5), headdim=kwargs.pop("headdim", 4), **kwargs)


def test_a_cache_of_another_shape_is_refused():
    m = _mixer()
    with pytest.raises(ValueError, match="cache shapes"):
        m.step(torch.randn(2, m.d_model, dtype=torch.float64), m.allocate_state(3, dtype=torch.float64))
