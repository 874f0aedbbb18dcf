"""Hybrid language models (issue 31): attention layers and MLPs among the Mamba layers, in any
pattern. Prefill-then-step equals the full forward for every pattern, a conversation's next
turn continues the cache exactly, chunked training carries the attention's keys and values and
gives the whole sequence's loss and gradient, the trainer trains a hybrid, and bad patterns and
head configurations are ValueErrors naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.config import AttentionConfig, parse_attn_layers
from mambakit.modules import Attention, GatedMLP, Mamba, Mamba2, MixtureOfExperts, NormedXProj

VOCAB = 61
ATTN = {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4}
# layer patterns: the mixer of the other layers, the attention layers, and the rest of the config
PATTERNS = {
    "mamba1_attn_first_mlp": dict(layer="mamba", attn_layer_idx=[0], attn_cfg=ATTN, d_intermediate=40),
    "mamba2_attn_last": dict(layer="mamba2", attn_layer_idx=[2], attn_cfg=ATTN),
    "mamba2_attn_middle_mlp_conv": dict(layer="mamba2", attn_layer_idx=[1], d_intermediate=24,
                                        attn_cfg={**ATTN, "d_conv": 4, "qkv_proj_bias": False}),
    "mamba1_mlp_only": dict(layer="mamba", d_intermediate=40),
    "jamba_like_moe_inner_norms": dict(layer="mamba", attn_layer_idx=[1], attn_cfg={"num_heads": 2}, d_intermediate=24,
                                       num_experts=3, num_experts_per_tok=2, moe_layer_idx=[0, 2], inner_norms=True),
    "window_mqa": dict(layer="mamba", attn_layer_idx=[0, 2],
                       attn_cfg={"num_heads": 4, "num_heads_kv": 1, "rotary_emb_dim": 8, "window_size": 4}),
    "s4d_attention": dict(layer="s4d", attn_layer_idx=[1], attn_cfg=ATTN),
    "all_attention": dict(layer="mamba", attn_layer_idx=[0, 1, 2], attn_cfg=ATTN, d_intermediate=32),
}


def hybrid(seed: int = 0, dtype=torch.float32, **fields) -> MambaLM:
    torch.manual_seed(seed)
    config = MambaConfig(**{"d_model": 32, "n_layer": 3, "vocab_size": VOCAB, "d_state": 8, "headdim": 16,
                            "chunk_size": 4, **fields})
    model = MambaLM(config, dtype=dtype).eval()
    with torch.no_grad():  # larger weights than the init, so that every layer changes the logits
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def ids_of(batch=2, length=13, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fields", list(PATTERNS.values()), ids=list(PATTERNS))
def test_prefill_then_steps_equals_the_full_forward(fields):
    assert_prefill_then_steps_equals_the_full_forward(hybrid(**fields))


@pytest.mark.parametrize("chunk_size", [256, 4])  # the preset's chunk, and chunks the prompt crosses
def test_prefill_then_steps_equals_the_full_forward_for_the_hybrid_preset(chunk_size):
    """hybrid-tiny as it is (Mamba-2, attention with a qkv conv and partial rotary, no biases). At
    its width the logits reach about 10, so the tolerance is 1e-5 of that."""
    torch.manual_seed(0)
    model = MambaLM.from_name("hybrid-tiny", chunk_size=chunk_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert model.config.layer_pattern == "mmam"
    assert_prefill_then_steps_equals_the_full_forward(model, atol=1e-4)


def assert_prefill_then_steps_equals_the_full_forward(model: MambaLM, atol: float = 1e-5) -> None:
    ids = ids_of()
    with torch.no_grad():
        full = model(ids)  # (B, L, V)
        last, cache = model.prefill(ids[:, :5])
        stepped = [last] + [model.step(ids[:, t], cache) for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.stack(stepped, 1), full[:, 4:], rtol=1e-5, atol=atol)
    assert cache.seqlen == ids.shape[1]


def test_the_blocks_are_built_as_the_pattern_says():
    model = hybrid(**PATTERNS["jamba_like_moe_inner_norms"])
    layers = model.backbone.layers
    assert [type(b.mixer) for b in layers] == [Mamba, Attention, Mamba]
    assert [type(b.mlp) for b in layers] == [MixtureOfExperts, GatedMLP, MixtureOfExperts]
    assert type(layers[0].mixer.x_proj) is NormedXProj
    assert model.config.layer_pattern == "mam"
    plain = hybrid(layer="mamba2", attn_layer_idx=[1], attn_cfg=ATTN)
    assert [type(b.mixer) for b in plain.backbone.layers] == [Mamba2, Attention, Mamba2]
    assert all(b.mlp is None and not hasattr(b, "norm2") for b in plain.backbone.layers)


@pytest.mark.parametrize("name", ["mamba2_attn_middle_mlp_conv", "window_mqa"])
def test_a_conversation_continues_the_cache_exactly(name):
    """prefill(turn 2, cache=after turn 1) equals prefill(turn 1 + turn 2), the KV caches
    growing past what the first turn allocated."""
    model = hybrid(**PATTERNS[name])
    t1, t2 = ids_of(length=6, seed=3), ids_of(length=9, seed=4)
    with torch.no_grad():
        whole, _ = model.prefill(torch.cat([t1, t2], 1))
        _, cache = model.prefill(t1)
        continued, cache = model.prefill(t2, cache=cache)
    torch.testing.assert_close(continued, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mamba1_attn_first_mlp", "mamba2_attn_middle_mlp_conv", "window_mqa",
                                  "jamba_like_moe_inner_norms"])
def test_chunked_loss_carries_the_keys_and_gives_the_whole_loss_and_gradient(name):
    model = hybrid(dtype=torch.float64, **PATTERNS[name]).train()
    ids, targets = ids_of(length=14), ids_of(length=14, seed=9)
    whole = model(ids, targets=targets)
    grads = torch.autograd.grad(whole, list(model.parameters()))
    chunked = model(ids, targets=targets, chunk_len=4)  # four chunks, the last one short
    chunked_grads = torch.autograd.grad(chunked, list(model.parameters()))
    torch.testing.assert_close(chunked, whole, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, chunked_grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_activation_checkpointing_keeps_the_gradient():
    model = hybrid(dtype=torch.float64, **PATTERNS["mamba1_attn_first_mlp"]).train()
    ids, targets = ids_of(), ids_of(seed=5)
    grads = torch.autograd.grad(model(ids, targets=targets), list(model.parameters()))
    model.activation_checkpointing_enable()
    again = torch.autograd.grad(model(ids, targets=targets), list(model.parameters()))
    for a, b in zip(grads, again):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_the_trainer_trains_a_hybrid_in_chunks_and_generate_decodes_it(tmp_path, capsys):
    """`mambakit train` takes the hybrid fields as flags (the layers as indices or a pattern,
    attn_cfg as JSON), trains in chunks (the keys carried), and `generate` loads and decodes it."""
    from mambakit.cli import main
    out = tmp_path / "run"
    assert main(["train", "--out-dir", str(out), "--max-steps", "2", "--seq-len", "24", "--batch-size", "2",
                 "--eval-every", "2", "--eval-batches", "1", "--save-every", "2", "--max-corpus-bytes", "100000",
                 "--d-model", "32", "--n-layer", "3", "--d-state", "8", "--chunk-len", "8", "--attn-layer-idx", "mam",
                 "--attn-cfg", json.dumps(ATTN), "--d-intermediate", "32"]) == 0
    model = MambaLM.from_pretrained(out)
    assert model.config.layer_pattern == "mam" and model.config.d_intermediate == 32
    assert model.config.attention.num_heads_kv == 2
    saved = json.loads((out / "train_config.json").read_text())["model"]
    assert saved["attn_layer_idx"] == [1] and saved["attn_cfg"]["num_heads"] == 4
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_the_official_init_rescales_every_residual_branch():
    """out_proj of every mixer and fc2 of every MLP: kaiming-uniform / sqrt(2 n_layer) with MLPs."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=64, n_layer=8, vocab_size=VOCAB, attn_layer_idx=[3],
                                attn_cfg={"num_heads": 4}, d_intermediate=256))
    bound = 1 / 64 ** 0.5 / (2 * 8) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in), rescaled
    for block in model.backbone.layers:
        for weight in (block.mixer.out_proj.weight, block.mlp.fc2.weight):
            fan_in = weight.shape[1]
            assert weight.abs().max() <= bound * (64 / fan_in) ** 0.5 + 1e-7
            assert weight.abs().max() > 0.8 * bound * (64 / fan_in) ** 0.5


BAD = {
    "index_out_of_range": (dict(attn_layer_idx=[3], attn_cfg=ATTN), "attn_layer_idx"),
    "index_twice": (dict(attn_layer_idx=[1, 1], attn_cfg=ATTN), "attn_layer_idx"),
    "index_not_int": (dict(attn_layer_idx=[1.0], attn_cfg=ATTN), "attn_layer_idx"),
    "indices_not_a_list": (dict(attn_layer_idx={"1": 1}, attn_cfg=ATTN), "attn_layer_idx"),
    "pattern_of_another_length": (dict(attn_layer_idx="mama", attn_cfg=ATTN), "attn_layer_idx"),
    "cfg_not_json": (dict(attn_layer_idx=[1], attn_cfg="{num_heads: 4}"), "attn_cfg"),
    "no_heads": (dict(attn_layer_idx=[1], attn_cfg={}), "attn_cfg.num_heads"),
    "heads_not_dividing_d_model": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 5}), "attn_cfg.num_heads"),
    "kv_heads_not_dividing": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "num_heads_kv": 3}),
                              "attn_cfg.num_heads_kv"),
    "rotary_odd": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "rotary_emb_dim": 3}), "attn_cfg.rotary_emb_dim"),
    "rotary_above_head_dim": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "rotary_emb_dim": 10}),
                              "attn_cfg.rotary_emb_dim"),
    "not_causal": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "causal": False}), "attn_cfg.causal"),
    "zero_window": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "window_size": 0}), "window_size"),
    "unknown_key": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 4, "heads": 2}), "attn_cfg"),
    "heads_as_text": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": "4"}), "num_heads"),
    "negative_mlp": (dict(d_intermediate=-8), "d_intermediate"),
    "experts_without_mlp": (dict(num_experts=4, num_experts_per_tok=2, moe_layer_idx=[0]), "moe_layer_idx"),
    "top_k_above_experts": (dict(num_experts=2, num_experts_per_tok=3, d_intermediate=8), "num_experts_per_tok"),
    "inner_norms_on_mamba2": (dict(layer="mamba2", inner_norms=True), "inner_norms"),
}


@pytest.mark.parametrize("fields,named", list(BAD.values()), ids=list(BAD))
def test_bad_patterns_and_heads_are_value_errors_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        MambaConfig(**{"d_model": 32, "n_layer": 3, "vocab_size": VOCAB, "headdim": 16, **fields})


def test_layer_patterns_and_indices_are_parsed_for_the_command_line():
    assert parse_attn_layers("1,3", 4) == [1, 3]
    assert parse_attn_layers("-1", 4) == [3]
    assert parse_attn_layers("mama", 4) == [1, 3]
    assert MambaConfig(d_model=32, n_layer=4, vocab_size=VOCAB, attn_layer_idx=parse_attn_layers("MAMA", 4),
                       attn_cfg=ATTN).layer_pattern == "mama"
    with pytest.raises(ValueError, match="4 layers"):
        parse_attn_layers("mam", 4)
    with pytest.raises(ValueError, match="indices"):
        parse_attn_layers("one", 4)
    # the command line's text, as MambaConfig takes it
    from_text = MambaConfig(d_model=32, n_layer=4, vocab_size=VOCAB, attn_layer_idx="0,-1", attn_cfg=json.dumps(ATTN))
    assert from_text.attn_layer_idx == [0, 3] and from_text.attention.rotary_emb_dim == 4


def test_attn_cfg_is_kept_resolved_so_equal_settings_compare_equal():
    short = MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, attn_layer_idx=[1], attn_cfg={"num_heads": 4})
    spelled = MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, attn_layer_idx=[1],
                          attn_cfg={"num_heads": 4, "num_heads_kv": 4, "head_dim": 8, "causal": True})
    assert short == spelled and short.attention == AttentionConfig(num_heads=4, num_heads_kv=4, head_dim=8)
    assert MambaConfig.from_dict(json.loads(json.dumps(short.to_dict()))) == short
