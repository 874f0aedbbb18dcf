"""One cache for a hybrid: the Mamba layers' constant states beside the attention layers'
pre-allocated KV caches. Batched prompts of different lengths give exactly the tokens each
gives alone (and so do the conversation's next turns), the cache's size is what its layers
hold, a saved cache (KV caches included) continues exactly, a cache of another model is
refused, and on the GPU a CUDA graph replays the whole hybrid step."""

from __future__ import annotations

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.generation import LMCache
from mambakit.modules import AttentionState, MambaState

VOCAB = 64
ATTN = {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4}
PATTERNS = {
    "mamba1_attn_mlp": dict(layer="mamba", attn_layer_idx=[1], attn_cfg=ATTN, d_intermediate=32),
    "mamba2_window_conv": dict(layer="mamba2", attn_layer_idx=[0, 2],
                               attn_cfg={**ATTN, "window_size": 5, "d_conv": 3}),
    "jamba_like_moe": dict(layer="mamba", attn_layer_idx=[1], attn_cfg={"num_heads": 2}, d_intermediate=24,
                           num_experts=3, num_experts_per_tok=2, moe_layer_idx=[0, 2], inner_norms=True),
}


def hybrid(seed=0, **fields) -> MambaLM:
    torch.manual_seed(seed)
    config = MambaConfig(**{"d_model": 32, "n_layer": 3, "vocab_size": VOCAB, "d_state": 8, "headdim": 16,
                            "chunk_size": 4, **fields})
    model = MambaLM(config).eval()
    with torch.no_grad():  # larger weights than the init, so that the tokens depend on the context
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("fields", list(PATTERNS.values()), ids=list(PATTERNS))
def test_batched_prompts_of_different_lengths_equal_each_alone(fields):
    model = hybrid(**fields)
    prompts = prompts_of([3, 11, 1, 7])
    batched = model.generate(prompts, max_new_tokens=9)
    for prompt, got in zip(prompts, batched):
        assert torch.equal(got, model.generate(prompt[None], max_new_tokens=9)[0])
    # the same prompts padded on the left, with a mask: the padding enters no state and no keys
    width = 11
    ids = torch.full((4, width), 5)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    for i, got in enumerate(batched):
        assert torch.equal(out[i, width:], got[len(prompts[i]):])


def test_the_next_turn_of_a_batched_conversation_equals_each_alone():
    """Rows at different positions (prompts of different lengths) take a next turn of the same
    length: each row's attention continues from its own position."""
    model = hybrid(**PATTERNS["mamba2_window_conv"])
    prompts, turn = prompts_of([2, 9, 5], seed=1), torch.randint(0, VOCAB, (3, 4))
    _, cache = model.prefill(prompts)
    first = model.generate(cache=cache, max_new_tokens=3)
    second = model.generate(turn, cache=cache, max_new_tokens=6)[:, 4:]
    for i, prompt in enumerate(prompts):
        _, alone = model.prefill(prompt[None])
        assert torch.equal(model.generate(cache=alone, max_new_tokens=3)[0], first[i])
        assert torch.equal(model.generate(turn[i:i + 1], cache=alone, max_new_tokens=6)[0, 4:], second[i])


def expected_nbytes(model: MambaLM, batch: int, slots: int) -> int:
    """The cache's size from the config: Mamba-1 conv (B, D_inner, K-1) and fp32 ssm (B, D_inner,
    N); per attention layer keys and values (B, Hkv, T, head_dim) and int64 lengths (B,);
    logits (B, V)."""
    config, attention, size = model.config, model.config.attention, 4
    total = batch * config.padded_vocab_size * size
    for kind in config.layer_types:
        if kind == "attention":
            total += 2 * batch * attention.num_heads_kv * slots * attention.head_dim * size + 8 * batch
        else:
            total += batch * config.d_inner * (config.d_conv - 1) * size + batch * config.d_inner * config.d_state * 4
    return total


def test_the_cache_size_is_stated_and_grows_with_the_context_until_a_window():
    model = hybrid(**PATTERNS["mamba1_attn_mlp"])
    _, cache = model.prefill(torch.randint(0, VOCAB, (2, 10)))
    assert cache.nbytes() == expected_nbytes(model, 2, 10)
    cache.reserve(50)
    assert cache.nbytes() == expected_nbytes(model, 2, 50)
    _, cache = model.prefill(torch.randint(0, VOCAB, (2, 10)), max_seqlen=64)  # room made up front
    assert cache.layers[1].capacity == 64 and cache.nbytes() == expected_nbytes(model, 2, 64)
    # a window bounds it: a ring of window_size slots whatever the length
    windowed = hybrid(layer="mamba", attn_layer_idx=[1], attn_cfg={**ATTN, "window_size": 6})
    sizes = [windowed.prefill(torch.randint(0, VOCAB, (1, n)))[1].nbytes() for n in (6, 40, 400)]
    assert sizes[0] == sizes[1] == sizes[2] == expected_nbytes(windowed, 1, 6)
    # a 130m-class hybrid (one attention layer in 24, GQA 12/4 heads of 64) at a 4k context, on no memory
    big = MambaLM(MambaConfig(d_model=768, n_layer=24, attn_layer_idx=[12],
                              attn_cfg={"num_heads": 12, "num_heads_kv": 4, "rotary_emb_dim": 32}), device="meta")
    cache = big.allocate_cache(1, device="meta", max_seqlen=4096)
    cache.last_logits = torch.empty(1, big.config.padded_vocab_size, device="meta")
    kv = 2 * 4 * 4096 * 64 * 4
    assert cache.nbytes() == expected_nbytes(big, 1, 4096) and kv == 8 * 2**20
    assert 8 * 2**20 < cache.nbytes() < 11 * 2**20


@pytest.mark.parametrize("name", ["mamba1_attn_mlp", "mamba2_window_conv"])
def test_a_saved_cache_continues_identically(name, tmp_path):
    model = hybrid(**PATTERNS[name])
    prompt = prompts_of([9], seed=2)[0][None]
    full = model.generate(prompt, max_new_tokens=14)
    _, cache = model.prefill(prompt)
    first = model.generate(cache=cache, max_new_tokens=5)  # the cache takes in all 5
    assert torch.equal(first, full[:, 9:14]) and cache.seqlen == 14
    cache.save(tmp_path / "mid.safetensors")
    loaded = LMCache.load(tmp_path / "mid.safetensors", model=model)
    kinds = [type(s) for s in loaded.layers]
    assert kinds == [AttentionState if k == "attention" else MambaState for k in model.config.layer_types]
    for have, saved in zip(loaded.layers, cache.layers):
        if isinstance(have, AttentionState):  # the slots that hold something, and the positions
            held = min(saved.capacity, 14)
            assert torch.equal(have.k, saved.k[:, :, :held]) and torch.equal(have.lengths, saved.lengths)
            assert have.window == saved.window
    assert torch.equal(model.generate(cache=loaded, max_new_tokens=9), full[:, 14:])
    # sampled, from a cache loaded without the model (the file says which layers are attention)
    whole = model.generate(prompt, max_new_tokens=8, temperature=0.8, seed=3)
    _, cache = model.prefill(prompt)
    cache.save(tmp_path / "prompt.safetensors")
    rest = model.generate(cache=LMCache.load(tmp_path / "prompt.safetensors"), max_new_tokens=8, temperature=0.8,
                          seed=3)
    assert torch.equal(rest, whole[:, 9:])


def test_a_mamba2_cache_continues_and_saves():
    """A pure Mamba-2 model's cache (ssm (B, H, P, N), conv (B, conv_dim, K-1)) is a valid cache:
    a conversation's next turn continues it, and it saves and loads."""
    model = hybrid(layer="mamba2")
    t1, t2 = torch.randint(0, VOCAB, (2, 6)), torch.randint(0, VOCAB, (2, 5))
    whole, _ = model.prefill(torch.cat([t1, t2], 1))
    _, cache = model.prefill(t1)
    continued, cache = model.prefill(t2, cache=cache)
    torch.testing.assert_close(continued, whole, rtol=1e-5, atol=1e-5)
    assert model.generate(cache=cache, max_new_tokens=3).shape == (2, 3)


def test_a_cache_of_another_layer_pattern_is_refused(tmp_path):
    model = hybrid(**PATTERNS["mamba1_attn_mlp"])
    other = hybrid(layer="mamba", attn_layer_idx=[2], attn_cfg=ATTN, d_intermediate=32)
    _, cache = other.prefill(torch.randint(0, VOCAB, (1, 4)))
    with pytest.raises(ValueError, match="layer_pattern"):
        model.generate(cache=cache, max_new_tokens=2)
    cache.architecture = None  # without the architecture, the states' kinds still differ
    with pytest.raises(ValueError, match="attention layer"):
        model.generate(cache=cache, max_new_tokens=2)
    cache.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors"):
        LMCache.load(tmp_path / "other.safetensors", model=model)


def test_an_mlp_hybrid_decodes_through_its_mlps_on_cpu():
    """Every block's MLP runs in decoding (the planned CPU step knows Mamba blocks only, so a
    hybrid decodes through model.step): generate equals a step-by-step greedy loop."""
    model = hybrid(layer="mamba", d_intermediate=48)
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)[:, 5:]
    with torch.no_grad():
        logits, cache = model.prefill(prompt)
        tokens = []
        for _ in range(6):
            tokens.append(logits[:, :VOCAB].argmax(-1))
            logits = model.step(tokens[-1], cache)
    assert torch.equal(out, torch.stack(tokens, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PATTERNS))
def test_cuda_graph_decoding_of_a_hybrid_equals_eager(name):
    model = hybrid(**PATTERNS[name]).cuda()
    prompts = [p.cuda() for p in prompts_of([4, 9], seed=5)]
    graphed = model.generate(prompts, max_new_tokens=12, cuda_graph=True)
    eager = model.generate(prompts, max_new_tokens=12, cuda_graph=False)
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    _, cache = model.prefill(prompts)  # the graph's cache comes back: the conversation goes on
    model.generate(cache=cache, max_new_tokens=5, cuda_graph=True)
    assert cache.seqlen == 9 + 5 and cache.layers[model.config.attn_layer_idx[0]].lengths.tolist() == [9, 14]
