"""mamba_ssm's Mamba-2 entry points in mambakit.compat, against independent float64 references:
mamba_chunk_scan_combined against the sequential `ssd_ref`, with packed sequences (seq_idx) equal
to running each sequence on its own, per-sequence final states (return_varlen_states), the
official return conventions; mamba_split_conv1d_scan_combined against the layer composed by hand
(conv, SSD, the grouped gated RMSNorm, out_proj), values and gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit import compat
from mambakit.ops import causal_conv1d_ref, ssd_ref
from tests.compat.test_conv import packed_rows, seq_idx_from_lengths

FAST = settings(max_examples=25, deadline=None, derandomize=True)
EXACT = dict(rtol=1e-9, atol=1e-10)


def scan_inputs(batch, length, heads, headdim, groups, d_state, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return dict(x=rnd(batch, length, heads, headdim), dt=rnd(batch, length, heads, scale=0.5),
                A=-(torch.rand(heads, generator=g, dtype=torch.float64) + 0.2).to(dtype),
                B=rnd(batch, length, groups, d_state), C=rnd(batch, length, groups, d_state),
                D=rnd(heads, headdim), z=rnd(batch, length, heads, headdim), dt_bias=rnd(heads, scale=0.3))


@st.composite
def scan_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(rows=draw(packed_rows(max_len=30)), heads=heads, headdim=draw(st.sampled_from([1, 3])),
                groups=draw(st.sampled_from([g for g in (1, 2) if heads % g == 0])),
                d_state=draw(st.sampled_from([1, 4])), chunk=draw(st.sampled_from([1, 3, 4, 16, 256])),
                with_init=draw(st.booleans()), first_ids=draw(st.sampled_from(["zero", "mixed"])),
                dt_limit=draw(st.sampled_from([(0.0, math.inf), (0.1, 0.9)])), seed=draw(st.integers(0, 2**16)))


@FAST
@given(case=scan_cases())
def test_seq_idx_packing_equals_running_each_sequence_alone(case):
    rows = case["rows"]
    batch, length = len(rows), sum(rows[0])
    kw = scan_inputs(batch, length, case["heads"], case["headdim"], case["groups"], case["d_state"], seed=case["seed"])
    first_ids = [0] * batch if case["first_ids"] == "zero" else [r % 2 * 3 for r in range(batch)]
    seq_idx = seq_idx_from_lengths(rows, first_ids)
    h0 = torch.randn(batch, case["heads"], case["headdim"], case["d_state"], dtype=torch.float64) \
        if case["with_init"] else None
    opts = dict(dt_softplus=True, dt_limit=case["dt_limit"])
    out, final = compat.mamba_chunk_scan_combined(**kw, chunk_size=case["chunk"], initial_states=h0, seq_idx=seq_idx,
                                                  return_final_states=True, **opts)
    for r, lengths in enumerate(rows):
        start = 0
        for i, n in enumerate(lengths):
            # the initial state flows into a row's first sequence only where its id is 0, as officially
            init = h0[r:r + 1] if h0 is not None and i == 0 and first_ids[r] == 0 else None
            part = {k: (v[r:r + 1, start:start + n] if v.ndim >= 3 else v) for k, v in kw.items()}
            y_ref, h_ref = ssd_ref(**part, initial_state=init, return_final_state=True, **opts)
            torch.testing.assert_close(out[r:r + 1, start:start + n], y_ref, **EXACT)
            start += n
        torch.testing.assert_close(final[r:r + 1], h_ref, **EXACT)  # the row's last sequence


@FAST
@given(length=st.integers(1, 40), chunk=st.sampled_from([1, 4, 7, 64]), groups=st.sampled_from([1, 2]),
       with_init=st.booleans(), softplus=st.booleans(), dt_limit=st.sampled_from([(0.0, math.inf), (0.05, 0.5)]),
       seed=st.integers(0, 2**16))
def test_chunk_scan_matches_reference(length, chunk, groups, with_init, softplus, dt_limit, seed):
    kw = scan_inputs(2, length, 4, 3, groups, 5, seed=seed)
    h0 = torch.randn(2, 4, 3, 5, dtype=torch.float64) if with_init else None
    opts = dict(dt_softplus=softplus, dt_limit=dt_limit)
    y_ref, h_ref = ssd_ref(**kw, initial_state=h0, return_final_state=True, **opts)
    y = compat.mamba_chunk_scan_combined(**kw, chunk_size=chunk, initial_states=h0, **opts)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, y_ref, **EXACT)
    y, h = compat.mamba_chunk_scan_combined(**kw, chunk_size=chunk, initial_states=h0, return_final_states=True,
                                            **opts)
    torch.testing.assert_close(y, y_ref, **EXACT)
    torch.testing.assert_close(h, h_ref, **EXACT)


@pytest.mark.parametrize("return_final_states", [False, True])
def test_varlen_states_are_each_sequence_final_state(return_final_states):
    lengths = [5, 1, 9, 4]
    kw = scan_inputs(1, sum(lengths), 2, 3, 1, 4, seed=4)
    seq_idx = seq_idx_from_lengths([lengths])
    cu_seqlens = torch.tensor([0, 5, 6, 15, 19], dtype=torch.int32)
    h0 = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    result = compat.mamba_chunk_scan_combined(**kw, chunk_size=4, initial_states=h0, seq_idx=seq_idx,
                                              cu_seqlens=cu_seqlens, dt_softplus=True,
                                              return_final_states=return_final_states, return_varlen_states=True)
    assert len(result) == (3 if return_final_states else 2)
    varlen = result[-1]
    assert varlen.shape == (4, 2, 3, 4)
    for s, (a, b) in enumerate(zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])):
        part = {k: (v[:, a:b] if v.ndim >= 3 else v) for k, v in kw.items()}
        _, h_ref = ssd_ref(**part, initial_state=h0 if s == 0 else None, dt_softplus=True, return_final_state=True)
        torch.testing.assert_close(varlen[s:s + 1], h_ref, **EXACT)
    if return_final_states:
        torch.testing.assert_close(result[1], varlen[-1:], **EXACT)


def test_return_conventions_and_state_dtype():
    kw = scan_inputs(1, 8, 2, 2, 1, 3, dtype=torch.float32)
    out = compat.mamba_chunk_scan_combined(**kw, chunk_size=4)
    assert isinstance(out, torch.Tensor) and out.shape == kw["x"].shape
    _, final = compat.mamba_chunk_scan_combined(**kw, chunk_size=4, return_final_states=True)
    assert final.dtype == torch.float32
    kw16 = {k: (v.bfloat16() if k in ("x", "B", "C", "z") else v) for k, v in kw.items()}
    y, final = compat.mamba_chunk_scan_combined(**kw16, chunk_size=4, return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16  # officially: C's dtype by default
    _, final = compat.mamba_chunk_scan_combined(**kw16, chunk_size=4, return_final_states=True,
                                                state_dtype=torch.float32)
    assert final.dtype == torch.float32
    one = torch.tensor([0, 8], dtype=torch.int32)
    y, varlen = compat.mamba_chunk_scan_combined(**kw, chunk_size=4, cu_seqlens=one, return_varlen_states=True)
    torch.testing.assert_close(varlen, compat.mamba_chunk_scan_combined(**kw, chunk_size=4,
                                                                        return_final_states=True)[1])


def test_varlen_arguments_are_checked():
    kw = scan_inputs(1, 8, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="return_varlen_states=True needs cu_seqlens"):
        compat.mamba_chunk_scan_combined(**kw, chunk_size=4, return_varlen_states=True)
    two = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="must mark the sequences that seq_idx marks"):  # no seq_idx: one sequence
        compat.mamba_chunk_scan_combined(**kw, chunk_size=4, cu_seqlens=two, return_varlen_states=True)
    seq_idx = seq_idx_from_lengths([[3, 5]])
    y, varlen = compat.mamba_chunk_scan_combined(**kw, chunk_size=4, seq_idx=seq_idx, cu_seqlens=two,
                                                 return_varlen_states=True)
    assert varlen.shape[0] == 2
    kw2 = scan_inputs(2, 8, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="needs batch 1"):
        compat.mamba_chunk_scan_combined(**kw2, chunk_size=4, cu_seqlens=two, return_varlen_states=True)


# ---- mamba_split_conv1d_scan_combined --------------------------------------------------------

def split_reference(zxbcdt, conv_w, conv_b, dt_bias, A, D, *, heads, headdim, groups, d_state, d_mlp, norm_w, eps,
                    out_w, out_b, norm_before_gate, dt_limit, h0=None):
    """The Mamba-2 layer after in_proj, by hand in float64 from the official formulas."""
    batch, length, _ = zxbcdt.shape
    dim = heads * headdim
    x0, z0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, dim, dim + 2 * groups * d_state, heads], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), conv_w, conv_b, "silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, groups * d_state, groups * d_state], dim=-1)
    zh = z.reshape(batch, length, heads, headdim)
    y, final = ssd_ref(x.reshape(batch, length, heads, headdim), dt, A, B.reshape(batch, length, groups, d_state),
                       C.reshape(batch, length, groups, d_state), D=D, z=zh if norm_w is None else None,
                       dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit, initial_state=h0, return_final_state=True)
    y = y.reshape(batch, length, dim)
    if norm_w is not None:
        gate = z * torch.sigmoid(z)
        v = y if norm_before_gate else y * gate
        v = v.reshape(batch, length, groups, dim // groups)
        v = v / torch.sqrt((v ** 2).mean(-1, keepdim=True) + eps)
        y = v.reshape(batch, length, dim) * norm_w
        if norm_before_gate:
            y = y * gate
    if d_mlp:
        y = torch.cat([x0 * torch.sigmoid(x0) * z0, y], dim=-1)
    if out_w is not None:
        y = y @ out_w.T + (0 if out_b is None else out_b)
    return y, final


@FAST
@given(length=st.integers(1, 20), heads=st.sampled_from([2, 4]), groups=st.sampled_from([1, 2]),
       d_mlp=st.sampled_from([0, 3]), with_norm=st.booleans(), norm_before_gate=st.booleans(),
       with_out=st.booleans(), D_per_channel=st.booleans(), with_init=st.booleans(),
       dt_limit=st.sampled_from([(0.0, math.inf), (0.1, 0.9)]), seed=st.integers(0, 2**16))
def test_split_conv1d_scan_matches_the_layer_by_hand(length, heads, groups, d_mlp, with_norm, norm_before_gate,
                                                     with_out, D_per_channel, with_init, dt_limit, seed):
    g = torch.Generator().manual_seed(seed)
    headdim, d_state, width, batch = 3, 4, 4, 2
    dim = heads * headdim
    conv_dim = dim + 2 * groups * d_state

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    args = dict(zxbcdt=rnd(batch, length, 2 * d_mlp + dim + conv_dim + heads), conv_w=rnd(conv_dim, width, scale=0.5),
                conv_b=rnd(conv_dim), dt_bias=rnd(heads, scale=0.3), A=-(rnd(heads).abs() + 0.2),
                D=rnd(heads, headdim) if D_per_channel else rnd(heads))
    opts = dict(norm_w=rnd(dim) if with_norm else None, eps=1e-5, out_w=rnd(7, d_mlp + dim) if with_out else None,
                out_b=rnd(7) if with_out else None, h0=rnd(batch, heads, headdim, d_state) if with_init else None)
    want, want_final = split_reference(**args, **opts, heads=heads, headdim=headdim, groups=groups, d_state=d_state,
                                       d_mlp=d_mlp, norm_before_gate=norm_before_gate, dt_limit=dt_limit)
    got, final = compat.mamba_split_conv1d_scan_combined(
        args["zxbcdt"], args["conv_w"], args["conv_b"], args["dt_bias"], args["A"], args["D"], chunk_size=4,
        initial_states=opts["h0"], dt_limit=dt_limit, return_final_states=True, activation="silu",
        rmsnorm_weight=opts["norm_w"], rmsnorm_eps=opts["eps"], outproj_weight=opts["out_w"],
        outproj_bias=opts["out_b"], headdim=headdim, ngroups=groups, norm_before_gate=norm_before_gate)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(final, want_final, **EXACT)


def test_split_conv1d_scan_gradients_match_the_layer_by_hand():
    g = torch.Generator().manual_seed(5)
    heads, headdim, groups, d_state, length = 4, 2, 2, 3, 11
    dim, conv_dim = heads * headdim, heads * headdim + 2 * groups * d_state
    leaves = dict(zxbcdt=torch.randn(2, length, dim + conv_dim + heads, generator=g, dtype=torch.float64),
                  conv_w=torch.randn(conv_dim, 4, generator=g, dtype=torch.float64),
                  conv_b=torch.randn(conv_dim, generator=g, dtype=torch.float64),
                  dt_bias=torch.randn(heads, generator=g, dtype=torch.float64) * 0.3,
                  A=-torch.rand(heads, generator=g, dtype=torch.float64) - 0.2,
                  D=torch.randn(heads, generator=g, dtype=torch.float64),
                  norm_w=torch.randn(dim, generator=g, dtype=torch.float64),
                  out_w=torch.randn(5, dim, generator=g, dtype=torch.float64))
    grads = []
    for by_hand in (True, False):
        t = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        if by_hand:
            y, _ = split_reference(t["zxbcdt"], t["conv_w"], t["conv_b"], t["dt_bias"], t["A"], t["D"], heads=heads,
                                   headdim=headdim, groups=groups, d_state=d_state, d_mlp=0, norm_w=t["norm_w"],
                                   eps=1e-6, out_w=t["out_w"], out_b=None, norm_before_gate=False,
                                   dt_limit=(0.0, math.inf))
        else:
            y = compat.mamba_split_conv1d_scan_combined(t["zxbcdt"], t["conv_w"], t["conv_b"], t["dt_bias"], t["A"],
                                                        t["D"], 4, rmsnorm_weight=t["norm_w"],
                                                        outproj_weight=t["out_w"], headdim=headdim, ngroups=groups,
                                                        norm_before_gate=False)
        y.sin().sum().backward()
        grads.append({k: v.grad for k, v in t.items()})
    for name in leaves:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-8, atol=1e-10)


def test_split_conv1d_scan_with_seq_idx_runs_each_sequence_alone():
    g = torch.Generator().manual_seed(6)
    heads, headdim, d_state = 2, 2, 3
    dim, conv_dim = heads * headdim, heads * headdim + 2 * d_state
    lengths = [4, 7, 2]
    zxbcdt = torch.randn(1, sum(lengths), dim + conv_dim + heads, generator=g, dtype=torch.float64)
    weights = (torch.randn(conv_dim, 4, generator=g, dtype=torch.float64), None,
               torch.zeros(heads, dtype=torch.float64), -torch.ones(heads, dtype=torch.float64),
               torch.ones(heads, dtype=torch.float64))
    norm = dict(rmsnorm_weight=torch.ones(dim, dtype=torch.float64), headdim=headdim)
    packed = compat.mamba_split_conv1d_scan_combined(zxbcdt, *weights, 4, seq_idx=seq_idx_from_lengths([lengths]),
                                                     **norm)
    start = 0
    for n in lengths:
        alone = compat.mamba_split_conv1d_scan_combined(zxbcdt[:, start:start + n], *weights, 4, **norm)
        torch.testing.assert_close(packed[:, start:start + n], alone, **EXACT)
        start += n


def test_split_conv1d_scan_arguments_are_checked():
    zxbcdt, conv_w = torch.randn(1, 5, 2 * 4 + 2 * 3 + 2), torch.randn(4 + 2 * 3, 4)
    dt_bias, A = torch.zeros(2), -torch.ones(2)
    with pytest.raises(ValueError, match="headdim must be given"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt, conv_w, None, dt_bias, A, torch.ones(2), 4)
    with pytest.raises(ValueError, match="zxbcdt"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt[..., :-1], conv_w, None, dt_bias, A, torch.ones(2), 4,
                                                headdim=2)
    with pytest.raises(ValueError, match="ngroups must be a positive int dividing nheads=2"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt, conv_w, None, dt_bias, A, torch.ones(2), 4, headdim=2,
                                                ngroups=3)
    with pytest.raises(ValueError, match="outproj_bias needs outproj_weight"):
        compat.mamba_split_conv1d_scan_combined(zxbcdt, conv_w, None, dt_bias, A, torch.ones(2, 2), 4,
                                                outproj_bias=torch.zeros(3))
