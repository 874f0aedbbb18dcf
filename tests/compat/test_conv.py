"""causal_conv1d's entry points in mambakit.compat: causal_conv1d_fn with packed sequences
(seq_idx) against running each sequence on its own, and causal_conv1d_update with a circular
buffer (cache_seqlens) and continuous batching (conv_state_indices) against a token-by-token
reference of the official semantics, in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit import compat
from mambakit.ops import causal_conv1d_ref

FAST = settings(max_examples=25, deadline=None, derandomize=True)
EXACT = dict(rtol=1e-12, atol=1e-12)


def seq_idx_from_lengths(rows: list[list[int]], first_ids: list[int] | None = None) -> torch.Tensor:
    """seq_idx (batch, L) int32 from each row's sequence lengths, ids counting up from first_ids."""
    out = []
    for r, lengths in enumerate(rows):
        start = 0 if first_ids is None else first_ids[r]
        out.append(torch.cat([torch.full((n,), start + i, dtype=torch.int32) for i, n in enumerate(lengths)]))
    return torch.stack(out)


@st.composite
def packed_rows(draw, max_len=24):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, max_len))
    rows = []
    for _ in range(batch):
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4)))) if length > 1 else []
        bounds = [0, *cuts, length]
        rows.append([b - a for a, b in zip(bounds, bounds[1:])])
    return rows


@FAST
@given(rows=packed_rows(), width=st.integers(2, 4), act=st.sampled_from([None, "silu"]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_with_seq_idx_runs_each_sequence_on_its_own(rows, width, act, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    batch, length, dim = len(rows), sum(rows[0]), 5
    x = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64) if with_bias else None
    seq_idx = seq_idx_from_lengths(rows)
    got = compat.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation=act)
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:  # each sequence alone, from zero past inputs
            want = causal_conv1d_ref(x[r:r + 1, :, start:start + n], w, b, act)
            torch.testing.assert_close(got[r:r + 1, :, start:start + n], want, **EXACT)
            start += n


def test_conv_padding_tokens_give_zero():
    x, w, b = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(3)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    got = compat.causal_conv1d_fn(x, w, b.double(), seq_idx=seq_idx, activation="silu")
    assert torch.equal(got[0, :, 5:], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(got[0, :, 3:5], causal_conv1d_ref(x[:1, :, 3:5], w, b.double(), "silu")[0], **EXACT)
    torch.testing.assert_close(got[1], causal_conv1d_ref(x[1:], w, b.double(), "silu")[0], **EXACT)


def test_conv_seq_idx_is_checked():
    x, w = torch.randn(2, 3, 8), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(batch, L\) = \(2, 8\)"):
        compat.causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(TypeError, match="seq_idx must hold integers"):
        compat.causal_conv1d_fn(x, w, seq_idx=torch.zeros(2, 8))


def update_reference(x, conv_state, weight, bias, act, cache_seqlens, indices):
    """The official update token by token in float64: returns (out, new conv_state)."""
    state = conv_state.clone()
    batch, dim, seqlen = x.shape
    width, state_len = weight.shape[1], state.shape[2]
    out = torch.zeros(batch, dim, seqlen, dtype=torch.float64)
    for b in range(batch):
        row = b if indices is None else int(indices[b])
        if row < 0:
            continue  # padding: output 0, state untouched
        if cache_seqlens is None:
            window = list(state[row].unbind(-1))[state_len - (width - 1):]
            buffer = list(state[row].unbind(-1))
        else:
            pos = int(cache_seqlens[b])
            window = [state[row, :, (pos - (width - 1) + j) % state_len] for j in range(width - 1)]
        for t in range(seqlen):
            window.append(x[b, :, t])
            acc = sum(weight[:, k] * window[-width + k] for k in range(width)) + (0 if bias is None else bias)
            out[b, :, t] = F.silu(acc) if act else acc
            if cache_seqlens is None:
                buffer = buffer[1:] + [x[b, :, t]]
            else:
                state[row, :, (pos + t) % state_len] = x[b, :, t]
        if cache_seqlens is None:
            state[row] = torch.stack(buffer, dim=-1)
    return out, state


@FAST
@given(width=st.integers(2, 4), extra=st.integers(0, 5), seqlen=st.integers(1, 9), circular=st.booleans(),
       indexed=st.booleans(), act=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_update_matches_the_official_semantics(width, extra, seqlen, circular, indexed, act, seed):
    g = torch.Generator().manual_seed(seed)
    batch, dim, state_len = 3, 4, width - 1 + extra
    state_rows = 5 if indexed else batch
    x = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    state = torch.randn(state_rows, dim, state_len, generator=g, dtype=torch.float64)
    w = torch.randn(dim, width, generator=g, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    lens = torch.randint(0, 40, (batch,), generator=g, dtype=torch.int32) if circular else None
    indices = torch.tensor([4, -1, 1], dtype=torch.int32) if indexed else None
    want, want_state = update_reference(x, state, w, b, act, lens, indices)
    got = compat.causal_conv1d_update(x, state, w, b, "silu" if act else None, cache_seqlens=lens,
                                      conv_state_indices=indices)
    torch.testing.assert_close(got, want, **EXACT)
    torch.testing.assert_close(state, want_state, **EXACT)


def test_conv_update_one_token_squeezes_and_circular_decode_continues_the_conv():
    """Decoding token by token through a circular buffer equals the conv over the whole sequence."""
    x, w, b = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), None
    state = torch.zeros(2, 3, 6, dtype=torch.float64)
    lens = torch.tensor([0, 0], dtype=torch.int32)
    outs = []
    for t in range(12):
        y = compat.causal_conv1d_update(x[..., t], state, w, b, "silu", cache_seqlens=lens + t)
        assert y.shape == (2, 3)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, -1), causal_conv1d_ref(x, w, b, "silu"), **EXACT)


def test_conv_update_arguments_are_checked():
    x, state, w = torch.randn(2, 3), torch.randn(2, 3, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        compat.causal_conv1d_update(x, state, w, cache_seqlens=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="conv_state_indices must be < conv_state's batch 2"):
        compat.causal_conv1d_update(x, state, w, conv_state_indices=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="conv_state must be"):
        compat.causal_conv1d_update(x, torch.randn(2, 3, 2), w)
