"""Mamba-2's fused Triton decoding step against its spec `ssd_state_update_ref`: y and the new
state over drawn shapes (groups, heads per group, D per head or channel, gate, softplus, limit),
and a bf16 state whose output comes from the fp32 state before it is rounded. Under
TRITON_INTERPRET=1 on a machine without CUDA; compiled on the GPU."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from mambakit import ops  # noqa: E402
from mambakit.ops.reference import ssd_state_update_ref  # noqa: E402
from tests.ops.test_ssd_step import _inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3), groups=st.sampled_from([1, 2]), per_group=st.sampled_from([1, 3]),
       headdim=st.sampled_from([1, 4, 24]), d_state=st.sampled_from([1, 5, 16, 128]),
       d_shape=st.sampled_from([None, "H", "HP"]), gate=st.booleans(), softplus=st.booleans(),
       limit=st.sampled_from([(0.0, math.inf), (0.05, 0.5)]))
def test_triton_step_equals_its_spec(batch, groups, per_group, headdim, d_state, d_shape, gate, softplus, limit):
    a = _inputs(batch, groups * per_group, groups, headdim, d_state, d_shape=d_shape, gate=gate)
    state = a.pop("state")
    want_y, want_state = ssd_state_update_ref(state, **a, dt_softplus=softplus, dt_limit=limit)
    got_state = state.float().to(DEVICE)
    got_y = ops.ssd_state_update_(got_state, **{k: v.float().to(DEVICE) if v is not None else None for k, v in a.items()},
                                  dt_softplus=softplus, dt_limit=limit, backend="triton")
    torch.testing.assert_close(got_y.double().cpu(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state.double().cpu(), want_state, rtol=1e-4, atol=1e-4)


def test_half_state_output_comes_from_the_fp32_state():
    """An fp16 state (bf16 where compiled): y equals the spec run on the fp32 state, well inside
    the error that rounding the state first would give."""
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    a = _inputs(2, 8, 1, 64, 64, seed=3)
    state = a.pop("state").to(dtype)
    want_y, want_state = ssd_state_update_ref(state.double(), **a, dt_softplus=True)
    got_state = state.to(DEVICE)
    got_y = ops.ssd_state_update_(got_state, **{k: v.float().to(DEVICE) if v is not None else None for k, v in a.items()},
                                  dt_softplus=True, backend="triton")
    assert got_state.dtype == dtype
    torch.testing.assert_close(got_y.double().cpu(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state.double().cpu(), want_state, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("where", ["step", "scan"])
def test_a_per_channel_D_broadcast_with_stride_zero(where):
    """Mamba-2 callers (and the official tie_hdim convention) pass D per channel as a per-head value
    expanded over P, stride 0: the kernels read it as the values it holds, not as dense memory."""
    heads, headdim, d_state = 3, 8, 16
    g = torch.Generator().manual_seed(4)
    D_expanded = torch.randn(heads, 1, generator=g).expand(-1, headdim)  # (H, P), strides (1, 0)
    if where == "step":
        a = {k: v.float() if v is not None else None for k, v in _inputs(2, heads, 1, headdim, d_state).items()}
        state = a.pop("state")
        a.pop("D", None)
        outs = []
        for D in (D_expanded, D_expanded.contiguous()):
            s = state.clone().to(DEVICE)
            outs.append(ops.ssd_state_update_(s, **{k: v.to(DEVICE) for k, v in a.items() if v is not None},
                                              D=D.to(DEVICE), backend="triton").cpu())
    else:
        x = torch.randn(1, 20, heads, headdim, generator=g)
        dt = torch.rand(1, 20, heads, generator=g) * 0.5
        B, C = torch.randn(2, 1, 20, 1, d_state, generator=g)
        A = -torch.rand(heads, generator=g) - 0.5
        outs = [ops.ssd(x.to(DEVICE), dt.to(DEVICE), A.to(DEVICE), B.to(DEVICE), C.to(DEVICE), D=D.to(DEVICE),
                        chunk_size=8, backend="triton").cpu() for D in (D_expanded, D_expanded.contiguous())]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
