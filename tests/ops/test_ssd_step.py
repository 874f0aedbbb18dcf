"""Mamba-2's decoding step, `ops.ssd_state_update_`, against its spec `ssd_state_update_ref`
(the sequential `ssd_ref` over one token), steps chained against a whole `ssd_ref` run, the
output of a narrow state computed before the state is rounded, and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit import ops
from mambakit.ops.reference import ssd_ref, ssd_state_update_ref


def _inputs(batch, heads, groups, headdim, d_state, dtype=torch.float64, seed=0, d_shape="H", gate=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    D = None if d_shape is None else (r(heads) if d_shape == "H" else r(heads, headdim))
    return dict(state=r(batch, heads, headdim, d_state), x=r(batch, heads, headdim), dt=r(batch, heads),
                A=-torch.rand(heads, generator=g, dtype=torch.float64).to(dtype) - 0.1,
                B=r(batch, groups, d_state), C=r(batch, groups, d_state), D=D,
                z=r(batch, heads, headdim) if gate else None, dt_bias=r(heads))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), groups=st.sampled_from([1, 2]), per_group=st.sampled_from([1, 2, 3]),
       headdim=st.sampled_from([1, 4]), d_state=st.sampled_from([1, 5, 16]),
       d_shape=st.sampled_from([None, "H", "HP"]), gate=st.booleans(), softplus=st.booleans(),
       limit=st.sampled_from([(0.0, math.inf), (0.05, 0.5)]))
def test_the_step_equals_its_spec(batch, groups, per_group, headdim, d_state, d_shape, gate, softplus, limit):
    a = _inputs(batch, groups * per_group, groups, headdim, d_state, d_shape=d_shape, gate=gate)
    state = a.pop("state")
    want_y, want_state = ssd_state_update_ref(state, **a, dt_softplus=softplus, dt_limit=limit)
    got_state = state.clone()
    got_y = ops.ssd_state_update_(got_state, **a, dt_softplus=softplus, dt_limit=limit)
    torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_state, want_state, rtol=1e-12, atol=1e-12)


def test_chained_steps_equal_one_sequential_run():
    batch, heads, groups, headdim, d_state, length = 2, 4, 2, 3, 5, 7
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, length, heads, headdim, generator=g, dtype=torch.float64)
    dt = torch.randn(batch, length, heads, generator=g, dtype=torch.float64)
    B = torch.randn(batch, length, groups, d_state, generator=g, dtype=torch.float64)
    C = torch.randn(batch, length, groups, d_state, generator=g, dtype=torch.float64)
    A, D = -torch.rand(heads, dtype=torch.float64) - 0.1, torch.randn(heads, dtype=torch.float64)
    state0 = torch.randn(batch, heads, headdim, d_state, generator=g, dtype=torch.float64)
    want, final = ssd_ref(x, dt, A, B, C, D=D, dt_softplus=True, initial_state=state0, return_final_state=True)
    state = state0.clone()
    got = torch.stack([ops.ssd_state_update_(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D, dt_softplus=True)
                       for t in range(length)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)


def test_a_bf16_state_gives_the_output_of_the_fp32_state():
    """The official step reads y from the state after rounding it to bf16; here y comes from
    the fp32 state, so it matches the fp32 computation to fp32 accuracy (at dim 4096, N 64)."""
    a = _inputs(2, 64, 1, 64, 64, dtype=torch.float32, seed=3)
    state = a.pop("state")
    narrow = state.to(torch.bfloat16)
    wide = {k: None if v is None else v.double() for k, v in a.items()}
    want_y, _ = ssd_state_update_ref(narrow.double(), **wide, dt_softplus=True)
    got_y = ops.ssd_state_update_(narrow, **a, dt_softplus=True)
    assert narrow.dtype == torch.bfloat16
    torch.testing.assert_close(got_y.double(), want_y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,name", [
    (dict(x=torch.zeros(2, 4, 5)), "x"),
    (dict(dt=torch.zeros(2, 3)), "dt"),
    (dict(A=torch.zeros(3)), "A"),
    (dict(B=torch.zeros(2, 3, 5)), "B"),          # 3 groups do not divide 4 heads
    (dict(C=torch.zeros(2, 2, 4)), "C"),
    (dict(D=torch.zeros(5)), "D"),
    (dict(z=torch.zeros(2, 4, 2)), "z"),
    (dict(dt_bias=torch.zeros(2)), "dt_bias"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
    (dict(state=torch.zeros(2, 4, 3)), "state"),
    (dict(x="x"), "x"),
])
def test_bad_arguments_name_themselves(change, name):
    a = _inputs(2, 4, 2, 3, 5, dtype=torch.float32)
    a.update(change)
    with pytest.raises((ValueError, TypeError), match=name):
        ops.ssd_state_update_(**a)
