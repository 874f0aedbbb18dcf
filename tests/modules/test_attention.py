"""The hybrids' attention mixer against a naive softmax reference (float64, one query at a
time): grouped and multi-query heads, a partial rotary embedding (halves and interleaved), a
sliding window, the official MHA's qkv conv; its KV cache (prefill in chunks then steps, a ring
for a window, packed sequences), chunked training with the earlier keys carried, wrapped
submodules called, and bad shapes refused."""

from __future__ import annotations

import math

import pytest
import torch

from mambakit.modules import Attention, AttentionState

D_MODEL = 32
CASES = {
    "mha": dict(num_heads=4),
    "gqa_partial_rotary": dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4),
    "mqa_full_rotary_interleaved": dict(num_heads=4, num_heads_kv=1, rotary_emb_dim=8, rotary_emb_interleaved=True),
    "window_rotary_biasless": dict(num_heads=2, num_heads_kv=2, head_dim=12, rotary_emb_dim=6, window_size=3,
                                   qkv_proj_bias=False, out_proj_bias=False),
    "conv_scale_base": dict(num_heads=4, num_heads_kv=2, d_conv=3, rotary_emb_dim=4, softmax_scale=0.3,
                            rotary_emb_base=500.0),
}


def make(seed: int = 0, dtype=torch.float64, **kw) -> Attention:
    torch.manual_seed(seed)
    module = Attention(D_MODEL, **kw).to(dtype)
    with torch.no_grad():  # biases and conv taps away from their init, so a dropped one shows
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def inputs(batch=2, length=9, seed=1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, length, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q·k · scale) v for each query over the keys it may see, spelled out."""
    batch, length, _ = x.shape
    H, G, hd, rd = module.num_heads, module.num_heads_kv, module.head_dim, module.rotary_emb_dim
    qkv = x @ module.in_proj.weight.T
    if module.in_proj.bias is not None:
        qkv = qkv + module.in_proj.bias
    if module.d_conv:  # causal depthwise conv, zeros before the start, no activation
        w, K = module.conv1d.weight[:, 0], module.d_conv  # (C, K)
        padded = torch.cat([qkv.new_zeros(batch, K - 1, qkv.shape[-1]), qkv], dim=1)
        qkv = sum(padded[:, j:j + length] * w[:, j] for j in range(K)) + module.conv1d.bias
    q = qkv[..., :H * hd].reshape(batch, length, H, hd).clone()
    k = qkv[..., H * hd:(H + G) * hd].reshape(batch, length, G, hd).clone()
    v = qkv[..., (H + G) * hd:].reshape(batch, length, G, hd)
    for t in range(length):
        for i in range(rd // 2):
            angle = t * module.rotary_emb_base ** (-2 * i / rd)
            a, b = (2 * i, 2 * i + 1) if module.rotary_emb_interleaved else (i, i + rd // 2)
            for x_ in (q, k):
                xa, xb = x_[:, t, :, a].clone(), x_[:, t, :, b].clone()
                x_[:, t, :, a] = xa * math.cos(angle) - xb * math.sin(angle)
                x_[:, t, :, b] = xa * math.sin(angle) + xb * math.cos(angle)
    scale = module.softmax_scale or hd ** -0.5
    out = torch.zeros(batch, length, H, hd, dtype=x.dtype)
    for t in range(length):
        first = 0 if module.window_size is None else max(0, t - module.window_size + 1)
        for h in range(H):
            g = h // (H // G)
            scores = (k[:, first:t + 1, g] @ q[:, t, h, :, None])[..., 0] * scale  # (B, keys)
            out[:, t, h] = (torch.softmax(scores, -1)[..., None] * v[:, first:t + 1, g]).sum(1)
    out = out.reshape(batch, length, H * hd) @ module.out_proj.weight.T
    return out if module.out_proj.bias is None else out + module.out_proj.bias


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_forward_equals_the_naive_softmax_reference(kw):
    module, x = make(**kw), inputs()
    torch.testing.assert_close(module(x), naive(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_prefill_in_chunks_then_steps_equals_the_forward(kw):
    module, x = make(**kw), inputs(length=13)
    full = module(x)
    state = module.allocate_state(2, max_seqlen=2)  # too small: the prefill grows it
    got = [module(x[:, :5], cache=state), module(x[:, 5:8], cache=state)]
    state.reserve(13)  # the steps run on fixed buffers
    got += [module.step(x[:, t], state)[:, None] for t in range(8, 13)]
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-10, atol=1e-10)
    assert state.lengths.tolist() == [13, 13]
    if module.window_size is None:
        assert state.capacity >= 13
    else:  # a ring of window_size slots, whatever the length
        assert state.capacity == module.window_size


def test_a_window_keeps_a_ring_of_its_size_over_a_long_prompt():
    module = make(num_heads=2, rotary_emb_dim=8, window_size=4)
    x = inputs(batch=1, length=30)
    state = module.allocate_state(1, max_seqlen=100)
    assert state.capacity == 4  # no step ever needs more: no reserve
    out = torch.cat([module(x[:, :11], cache=state)] + [module.step(x[:, t], state)[:, None] for t in range(11, 30)], 1)
    torch.testing.assert_close(out, naive(module, x), rtol=1e-10, atol=1e-10)
    assert state.capacity == 4 and state.nbytes() == 2 * 1 * 2 * 4 * 16 * 8 + 8


def test_a_cache_built_by_hand_knows_how_far_it_is_filled():
    """An AttentionState made from tensors (not by allocate_state) reads its host-side bound from
    its lengths, so that its steps attend to every key it holds."""
    module = make(**CASES["gqa_partial_rotary"])
    x = inputs(batch=1, length=6)
    state = module.allocate_state(1)
    module(x[:, :5], cache=state)
    state.reserve(8)
    rebuilt = AttentionState(state.k.clone(), state.v.clone(), state.lengths.clone())
    assert rebuilt.filled == 5
    torch.testing.assert_close(module.step(x[:, 5], rebuilt), module(x)[:, -1], rtol=1e-10, atol=1e-10)


def test_rows_at_different_positions_each_continue_their_own_sequence():
    """A batch whose rows hold different lengths (packed prompts) steps each row on its own."""
    module = make(**CASES["gqa_partial_rotary"])
    x = inputs(batch=2, length=12)
    lengths = [3, 8]
    state = module.allocate_state(2)
    cu = torch.tensor([0, 3, 11], dtype=torch.int32)
    packed = torch.cat([x[0:1, :3], x[1:2, :8]], dim=1)  # (1, 11)
    out = module(packed, cache=state, cu_seqlens=cu)
    assert state.lengths.tolist() == lengths
    torch.testing.assert_close(out[:, :3], module(x[0:1, :3]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, 3:], module(x[1:2, :8]), rtol=1e-10, atol=1e-10)
    state.reserve(20)
    stepped = module.step(torch.stack([x[0, 3], x[1, 8]]), state)  # row 0 at position 3, row 1 at 8
    torch.testing.assert_close(stepped[0], module(x[0:1, :4])[0, -1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stepped[1], module(x[1:2, :9])[0, -1], rtol=1e-10, atol=1e-10)


def test_packed_sequences_without_a_cache_attend_within_themselves():
    module = make(**CASES["conv_scale_base"])
    x = inputs(batch=1, length=10)
    out = module(x, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    torch.testing.assert_close(out[:, :4], module(x[:, :4]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, 4:], module(x[:, 4:]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [CASES["mha"], CASES["conv_scale_base"]], ids=["no-conv", "conv"])
@pytest.mark.parametrize("offsets", [[0, 4, 4, 10], [0, 6, 4, 10], [1, 4, 10], [0, 4, 9]])
def test_bad_packed_offsets_are_refused_naming_cu_seqlens(kw, offsets):
    """Empty, decreasing or misplaced offsets: a ValueError naming cu_seqlens, with or without the conv
    (which checks them itself)."""
    module = make(**kw)
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(inputs(batch=1, length=10), cu_seqlens=torch.tensor(offsets, dtype=torch.int32))


@pytest.mark.parametrize("kw", [CASES["gqa_partial_rotary"], CASES["window_rotary_biasless"], CASES["conv_scale_base"]],
                         ids=["full", "window", "conv"])
def test_chunks_with_the_earlier_keys_carried_give_the_whole_output_and_gradient(kw):
    module, x = make(**kw), inputs(length=11).requires_grad_()
    whole = module(x)
    state, parts = None, []
    for start in range(0, 11, 4):
        out, state = module.forward_with_states(x[:, start:start + 4], state, offset=start)
        parts.append(out)
    chunked = torch.cat(parts, 1)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(whole)
    grads_whole = torch.autograd.grad(whole, [x, *module.parameters()], g)
    grads_chunked = torch.autograd.grad(chunked, [x, *module.parameters()], g)
    for a, b in zip(grads_whole, grads_chunked):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if module.window_size is not None:  # only what the next chunk can see is carried
        assert state.k.shape[2] == module.window_size - 1


def test_fp32_matches_fp64_and_sdpa_runs_in_the_model_dtype():
    module64 = make(**CASES["gqa_partial_rotary"])
    module32 = make(dtype=torch.float32, **CASES["gqa_partial_rotary"])
    module32.load_state_dict({k: v.float() for k, v in module64.state_dict().items()})
    x = inputs()
    out = module32(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), module64(x), rtol=1e-4, atol=1e-5)


def test_wrapped_submodules_are_called():
    """A hook on in_proj, out_proj or the conv (a LoRA layer, a quantised Linear) runs on every
    path: the forward, the packed forward, the step."""
    module = make(**CASES["conv_scale_base"])
    x = inputs(batch=1, length=6)
    expected = module(x)
    calls = []
    for name in ("in_proj", "out_proj", "conv1d"):
        getattr(module, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)  # the conv called, same math
    assert calls == ["in_proj", "conv1d", "out_proj"]
    state = module.allocate_state(1, max_seqlen=6)
    module(x[:, :5], cache=state)
    calls.clear()
    torch.testing.assert_close(module.step(x[:, 5], state), expected[:, 5], rtol=1e-10, atol=1e-10)
    assert calls == ["in_proj", "conv1d", "out_proj"]


def test_bad_shapes_and_caches_are_refused():
    module = make(**CASES["gqa_partial_rotary"])
    with pytest.raises(ValueError, match=r"\(B, L, 32\)"):
        module(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch 1"):
        module(inputs(), cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))
    other = make(num_heads=4).allocate_state(2, max_seqlen=4)
    with pytest.raises(ValueError, match="heads=2"):
        module(inputs(), cache=other)
    with pytest.raises(TypeError, match="AttentionState"):
        module.step(inputs()[:, 0], cache=object())
    full = module.allocate_state(2, max_seqlen=3)
    module(inputs(length=3), cache=full)
    with pytest.raises(ValueError, match="full"):  # a step needs room: LMCache.reserve / generate make it
        module.step(inputs()[:, 0], full)
    windowed = make(num_heads=4, window_size=5)
    small_ring = windowed.allocate_state(2, max_seqlen=3)  # below the window: a step must not wrap around
    windowed(inputs(length=3), cache=small_ring)
    with pytest.raises(ValueError, match="full"):
        windowed.step(inputs()[:, 0], small_ring)
    with pytest.raises(ValueError, match="num_heads_kv"):
        Attention(D_MODEL, num_heads=4, num_heads_kv=3)
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        Attention(D_MODEL, num_heads=4, rotary_emb_dim=5)


def test_state_reserve_keeps_what_it_holds():
    module = make(num_heads=2)
    state = module.allocate_state(1, max_seqlen=2)
    x = inputs(batch=1, length=2)
    module(x, cache=state)
    k = state.k.clone()
    state.reserve(5)
    assert isinstance(state, AttentionState) and state.capacity == 5
    assert torch.equal(state.k[:, :, :2], k) and not state.k[:, :, 2:].any()


@pytest.mark.parametrize("wrapped_conv", [False, True], ids=["fused_conv", "called_conv"])
def test_sdpa_gets_heads_with_unit_channel_stride(monkeypatch, wrapped_conv):
    """SDPA's flash and memory-efficient kernels need q, k and v at stride 1 in their last
    dimension; with any other stride it falls back to the math kernel, whose memory grows with
    the square of the length (a hybrid's training at 2 x 8192 took 46 GiB instead of 26). The conv
    writes its output (B, C, L), so the heads cut from it must be made contiguous."""
    import torch.nn.functional as F
    module = make(**CASES["conv_scale_base"])
    if wrapped_conv:  # a hook: the module is called rather than fused (as under a LoRA wrapper)
        module.conv1d.register_forward_hook(lambda m, i, o: None)
    strides = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        strides.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    x = inputs(length=9)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # "No available kernel" for heads at another stride
        module(x)
    state = module.allocate_state(2, max_seqlen=10)
    module(x, cache=state)
    module.step(x[:, 0], state)
    assert strides and all(s == (1, 1, 1) for s in strides), strides
