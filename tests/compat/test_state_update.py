"""mambakit.compat.selective_state_update in both official forms: Mamba-1's (batch, dim, N) state
and the headed (batch, nheads, dim, N) one, with A / dt / dt_bias tied over the head's channels
(stride 0, as Mamba-2 callers pass them) or not, with state_batch_indices (padding rows give 0),
and with a bf16 state, whose output must come from the fp32 state before it is rounded."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit import compat
from mambakit.ops import selective_state_update_ref

FAST = settings(max_examples=25, deadline=None, derandomize=True)
EXACT = dict(rtol=1e-12, atol=1e-12)


def headed_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The headed step in float64 from the state as given (e.g. a bf16 state's exact values), one
    head and channel at a time: returns (y (batch, H, P) float64, the new state float64)."""
    batch, heads, dim, d_state = state.shape
    per_group = heads // B.shape[1]
    f = (lambda t: None if t is None else t.double())
    state, x, dt, A, B, C, D, z, dt_bias = map(f, (state, x, dt, A, B, C, D, z, dt_bias))
    new = torch.empty_like(state)
    y = torch.empty(batch, heads, dim, dtype=torch.float64)
    for h in range(heads):
        g = h // per_group
        for p in range(dim):
            step = dt[:, h, p] + (0 if dt_bias is None else dt_bias[h, p])
            step = F.softplus(step) if dt_softplus else step  # (batch,)
            new[:, h, p] = state[:, h, p] * torch.exp(step[:, None] * A[h, p]) + (step * x[:, h, p])[:, None] * B[:, g]
            out = (new[:, h, p] * C[:, g]).sum(-1)
            if D is not None:
                out = out + D[h, p] * x[:, h, p]
            if z is not None:
                out = out * F.silu(z[:, h, p])
            y[:, h, p] = out
    return y, new


def headed_inputs(batch, heads, dim, groups, d_state, *, tied, dtype=torch.float64, state_dtype=None, seed=0,
                  state_rows=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if tied:  # one value per head, broadcast with stride 0 as transformers and mamba_ssm's Mamba2 pass them
        A = -(torch.rand(heads, generator=g, dtype=torch.float64) + 0.5).to(dtype)[:, None, None].expand(
            heads, dim, d_state)
        dt = rnd(batch, heads, 1, scale=0.5).expand(batch, heads, dim)
        dt_bias = rnd(heads, 1, scale=0.3).expand(heads, dim)
    else:
        A = -(torch.rand(heads, dim, d_state, generator=g, dtype=torch.float64) + 0.5).to(dtype)
        dt, dt_bias = rnd(batch, heads, dim, scale=0.5), rnd(heads, dim, scale=0.3)
    state = rnd(state_rows or batch, heads, dim, d_state).to(state_dtype or dtype)
    return dict(state=state, x=rnd(batch, heads, dim), dt=dt, A=A, B=rnd(batch, groups, d_state),
                C=rnd(batch, groups, d_state), D=rnd(heads, dim), z=rnd(batch, heads, dim), dt_bias=dt_bias)


@FAST
@given(heads=st.sampled_from([1, 2, 4]), dim=st.sampled_from([1, 3, 8]), d_state=st.sampled_from([1, 4, 16]),
       groups=st.sampled_from([1, 2]), tied=st.booleans(), softplus=st.booleans(), with_dz=st.booleans(),
       seed=st.integers(0, 2**16))
def test_headed_step_matches_reference(heads, dim, d_state, groups, tied, softplus, with_dz, seed):
    if heads % groups:
        groups = 1
    kw = headed_inputs(3, heads, dim, groups, d_state, tied=tied, seed=seed)
    if not with_dz:
        kw["D"] = kw["z"] = None
    state = kw.pop("state")
    y_ref, new_ref = headed_reference(state, **kw, dt_softplus=softplus)
    y = compat.selective_state_update(state, **kw, dt_softplus=softplus)
    assert y.shape == kw["x"].shape and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(state, new_ref, **EXACT)


@pytest.mark.parametrize("tied", [True, False])
def test_headed_step_with_state_batch_indices(tied):
    kw = headed_inputs(4, 4, 3, 2, 5, tied=tied, state_rows=6, seed=1)
    state = kw.pop("state")
    indices = torch.tensor([5, -1, 0, 2], dtype=torch.int32)  # row 1 is padding
    before = state.clone()
    y = compat.selective_state_update(state, **kw, dt_softplus=True, state_batch_indices=indices)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    for b, row in enumerate(indices.tolist()):
        if row < 0:
            continue
        pick = {k: (v[b:b + 1] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        y_ref, new_ref = headed_reference(before[row:row + 1], **pick, dt_softplus=True)
        torch.testing.assert_close(y[b:b + 1], y_ref, **EXACT)
        torch.testing.assert_close(state[row:row + 1], new_ref, **EXACT)
    untouched = [1, 3, 4]
    assert torch.equal(state[untouched], before[untouched])


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_state_output_comes_from_the_fp32_state(tied):
    """dim 4096 (64 heads of 64), d_state 64, with z: the output is the float64 reference from the
    exact update of the bf16 state's values, to fp32 rounding; only the stored state is rounded."""
    kw = headed_inputs(2, 64, 64, 1, 64, tied=tied, dtype=torch.float32, state_dtype=torch.bfloat16, seed=2)
    state = kw.pop("state")
    y_ref, new_ref = headed_reference(state, **kw, dt_softplus=True) if not tied else _tied_reference(state, kw)
    y = compat.selective_state_update(state, **kw, dt_softplus=True)
    assert y.dtype == torch.float32 and state.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), new_ref, rtol=2 ** -8, atol=1e-6)  # stored: bf16


def _tied_reference(state, kw):
    """headed_reference vectorised over the channels (the 64 x 64 loop is too slow for a test)."""
    A, dt, dt_bias = kw["A"][:, 0, 0].double(), kw["dt"][..., 0].double(), kw["dt_bias"][:, 0].double()
    step = F.softplus(dt + dt_bias)  # (batch, H)
    x, z = kw["x"].double(), kw["z"].double()
    new = state.double() * torch.exp(step * A)[..., None, None] + (step[..., None] * x)[..., None] * \
        kw["B"].double()[:, :, None, :]
    y = (new * kw["C"].double()[:, :, None, :]).sum(-1)
    return (y + kw["D"].double() * x) * F.silu(z), new


@pytest.mark.parametrize("with_indices", [False, True])
def test_mamba1_bf16_state_output_comes_from_the_fp32_state(with_indices):
    g = torch.Generator().manual_seed(3)
    batch, dim, n = 3, 16, 8
    state = torch.randn(batch, dim, n, generator=g).bfloat16()
    x, dt, z = (torch.randn(batch, dim, generator=g) for _ in range(3))
    A = -torch.rand(dim, n, generator=g) - 0.5
    B, C = torch.randn(batch, n, generator=g), torch.randn(batch, n, generator=g)
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    y_ref, new_ref = selective_state_update_ref(state.double(), x.double(), dt.double(), A.double(), B.double(),
                                                C.double(), D.double(), z.double(), bias.double(), True)
    indices = torch.tensor([2, 0, 1], dtype=torch.int32) if with_indices else None
    if with_indices:
        state = state[[1, 2, 0]].clone()  # row b of the batch lives at state[indices[b]]
    extra = dict(state_batch_indices=indices) if with_indices else {}
    y = compat.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias=bias, dt_softplus=True, **extra)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    stored = state[indices.long()] if with_indices else state
    torch.testing.assert_close(stored.double(), new_ref, rtol=2 ** -8, atol=1e-6)  # stored: bf16


def test_headed_shapes_are_checked():
    kw = headed_inputs(2, 4, 3, 2, 5, tied=False)
    state = kw.pop("state")
    with pytest.raises(ValueError, match=r"A must have shape \(4, 3, 5\)"):
        compat.selective_state_update(state, **{**kw, "A": kw["A"][:, :, :2]})
    with pytest.raises(ValueError, match="B must be"):
        compat.selective_state_update(state, **{**kw, "B": torch.randn(2, 3, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="state_batch_indices must be < the state's batch 2"):
        compat.selective_state_update(state, **kw, state_batch_indices=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="state must be"):
        compat.selective_state_update(state[0, 0], **kw)
