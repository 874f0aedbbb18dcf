"""Hybrid checkpoints: the official hybrid format (config.json with attn_layer_idx, attn_cfg and
d_intermediate, pytorch_model.bin under the official names, as mamba_ssm's MixerModel, Block,
MHA and GatedMLP define them) both ways; transformers' JambaForCausalLM (Mamba-1 + attention +
mixture of experts) and BambaForCausalLM (Mamba-2 + attention) read with the same logits and
greedy tokens, and written back for transformers to read; and what a format cannot hold is a
ValueError that names the field, with nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mambakit import AutoModel, Mamba2LM, MambaConfig, MambaLM
from tests.checkpoint.weights import randomize_

VOCAB, D_MODEL = 56, 32
# mamba_ssm 2.x: the fields of its MambaConfig (models/config_mamba.py) and the keyword
# arguments of its MHA (modules/mha.py), all that attn_cfg may hold
OFFICIAL_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                          "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                          "tie_embeddings"}
OFFICIAL_MHA_KWARGS = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
                       "softmax_scale", "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base",
                       "rotary_emb_interleaved"}
OFFICIAL_HYBRIDS = {
    "mamba2_conv_rotary_gqa": dict(layer="mamba2", attn_layer_idx=[1], d_intermediate=128,
                                   attn_cfg={"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "d_conv": 4,
                                             "rotary_emb_dim": 8, "qkv_proj_bias": False, "out_proj_bias": False}),
    "mamba1_biases_interleaved": dict(layer="mamba", attn_layer_idx=[0, 2], d_intermediate=0, tie_embeddings=False,
                                      attn_cfg={"num_heads": 2, "rotary_emb_dim": 16, "rotary_emb_interleaved": True,
                                                "softmax_scale": 0.2, "rotary_emb_base": 1000.0}),
}


def model_of(seed=1, **fields) -> MambaLM:
    config = MambaConfig(**{"d_model": D_MODEL, "n_layer": 3, "vocab_size": VOCAB, "d_state": 8, "headdim": 16,
                            "chunk_size": 4, **fields})
    torch.manual_seed(seed)
    return randomize_(MambaLM(config), seed).eval()


def ids_of(batch=2, length=11, seed=123):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


# ---- the official hybrid format ---------------------------------------------------------------

@pytest.mark.parametrize("fields", list(OFFICIAL_HYBRIDS.values()), ids=list(OFFICIAL_HYBRIDS))
def test_official_hybrid_round_trip_keeps_config_and_logits(tmp_path, fields):
    model = model_of(**fields)
    ids = ids_of()
    for fmt in ("official", "mambakit"):
        model.save_pretrained(tmp_path / fmt, format=fmt)
        loaded = AutoModel.from_pretrained(tmp_path / fmt)
        assert type(loaded) is (Mamba2LM if fields["layer"] == "mamba2" else MambaLM)
        for field in ("attn_layer_idx", "attn_cfg", "d_intermediate", "layer", "tie_embeddings"):
            assert getattr(loaded.config, field) == getattr(model.config, field), (fmt, field)
        assert torch.equal(logits_of(loaded, ids), logits_of(model, ids)), fmt


def test_official_hybrid_save_has_the_official_layout(tmp_path):
    model = model_of(**OFFICIAL_HYBRIDS["mamba2_conv_rotary_gqa"])
    model.save_pretrained(tmp_path, format="official")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    raw = json.loads((tmp_path / "config.json").read_text())
    assert set(raw) == OFFICIAL_CONFIG_FIELDS
    assert (raw["attn_layer_idx"], raw["d_intermediate"], raw["ssm_cfg"]["layer"]) == ([1], 128, "Mamba2")
    assert set(raw["attn_cfg"]) <= OFFICIAL_MHA_KWARGS and raw["attn_cfg"]["causal"] is True
    assert (raw["attn_cfg"]["num_heads"], raw["attn_cfg"]["num_heads_kv"], raw["attn_cfg"]["head_dim"],
            raw["attn_cfg"]["rotary_emb_dim"], raw["attn_cfg"]["d_conv"]) == (4, 2, 16, 8, 4)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    qkv = 16 * (4 + 2 * 2)
    attention = {k[len("backbone.layers.1."):]: tuple(v.shape) for k, v in state.items()
                 if k.startswith("backbone.layers.1.")}
    # MHA: in_proj (q, k, v), the depthwise conv1d with its bias, out_proj; the Block's norm2 and GatedMLP
    assert attention == {"norm.weight": (D_MODEL,), "mixer.in_proj.weight": (qkv, D_MODEL),
                         "mixer.conv1d.weight": (qkv, 1, 4), "mixer.conv1d.bias": (qkv,),
                         "mixer.out_proj.weight": (D_MODEL, 4 * 16), "norm2.weight": (D_MODEL,),
                         "mlp.fc1.weight": (2 * 128, D_MODEL), "mlp.fc2.weight": (D_MODEL, 128)}
    mamba_layer = {k for k in state if k.startswith("backbone.layers.0.")}
    assert {"backbone.layers.0.norm2.weight", "backbone.layers.0.mlp.fc1.weight",
            "backbone.layers.0.mixer.dt_bias"} <= mamba_layer  # every block has the MLP


def test_an_official_mamba2attn_config_loads(tmp_path):
    """mamba2attn's config.json (the 2.7b one's fields, scaled down): attn_cfg without the keys
    at the MHA's defaults, and a d_intermediate that the official GatedMLP rounds up to 128."""
    raw = {"d_model": D_MODEL, "d_intermediate": 100, "n_layer": 3, "vocab_size": VOCAB,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 4}, "attn_layer_idx": [1],
           "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 16, "num_heads": 2, "out_proj_bias": False,
                        "qkv_proj_bias": False, "rotary_emb_dim": 8},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
           "tie_embeddings": True}
    config = MambaConfig.from_official(raw)
    assert config.d_intermediate == 128 and config.attention.num_heads_kv == 2 and config.attention.d_conv == 4
    model = model_of(**{f: getattr(config, f) for f in ("layer", "attn_layer_idx", "attn_cfg", "d_intermediate")},
                     pad_vocab_size_multiple=16)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert torch.equal(logits_of(AutoModel.from_pretrained(tmp_path), ids_of()), logits_of(model, ids_of()))


def test_a_config_that_disagrees_with_the_weights_names_the_attention_fields(tmp_path):
    model = model_of(**OFFICIAL_HYBRIDS["mamba2_conv_rotary_gqa"])
    model.save_pretrained(tmp_path, format="official")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["attn_cfg"]["num_heads_kv"] = 4
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        AutoModel.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "attn_cfg" in str(err.value)


REFUSED_OFFICIAL = {
    "mlp_not_a_multiple_of_128": (dict(d_intermediate=48), "d_intermediate"),
    "sliding_window": (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 2, "window_size": 4}), "window_size"),
    "experts": (dict(d_intermediate=128, num_experts=2, num_experts_per_tok=1, moe_layer_idx=[0]), "moe_layer_idx"),
    "inner_norms": (dict(inner_norms=True), "inner_norms"),
}


@pytest.mark.parametrize("fields,named", list(REFUSED_OFFICIAL.values()), ids=list(REFUSED_OFFICIAL))
def test_what_the_official_format_cannot_hold_is_refused_before_writing(tmp_path, fields, named):
    with pytest.raises(ValueError, match=named):
        model_of(**fields).save_pretrained(tmp_path / "out", format="official")
    assert not (tmp_path / "out").exists()


# ---- transformers' Jamba and Bamba ------------------------------------------------------------

def jamba(seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.JambaConfig(**{
        "vocab_size": VOCAB, "hidden_size": D_MODEL, "intermediate_size": 40, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 1,
        "mamba_d_state": 8, "mamba_dt_rank": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
        **overrides})
    torch.manual_seed(seed)
    return randomize_(transformers.JambaForCausalLM(config), seed + 100).eval()


def bamba(seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.BambaConfig(**{
        "vocab_size": VOCAB, "hidden_size": D_MODEL, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attn_layer_indices": [1], "mamba_n_heads": 4,
        "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_chunk_size": 4,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **overrides})
    torch.manual_seed(seed)
    return randomize_(transformers.BambaForCausalLM(config), seed + 100).eval()


def greedy_of_transformers(hf, prompt, new):
    return hf.generate(prompt, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(prompt))


def check_same_model(ours, hf):
    ids = ids_of()
    expected = logits_of(hf, ids)
    assert expected.std() > 0.5  # logits that tell the tokens apart
    torch.testing.assert_close(logits_of(ours, ids), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the decoding path: prefill, then one step per token
        last, cache = ours.prefill(ids[:, :4])
        stepped = [last] + [ours.step(ids[:, t], cache) for t in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.stack(stepped, 1), expected[:, 3:], rtol=1e-4, atol=1e-4)
    prompt = ids_of(batch=1, length=5, seed=7)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), greedy_of_transformers(hf, prompt, 12))


@pytest.mark.parametrize("tied", [False, True])
def test_a_jamba_checkpoint_loads_with_the_same_logits_and_greedy_tokens(tmp_path, tied):
    hf = jamba(seed=int(tied), tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path)
    config = ours.config
    assert type(ours) is MambaLM and config.inner_norms and config.tie_embeddings == tied
    assert (config.attn_layer_idx, config.moe_layer_idx, config.num_experts, config.num_experts_per_tok) == (
        [1, 3], [1, 3], 4, 2)
    check_same_model(ours, hf)


def test_a_bamba_checkpoint_loads_with_the_same_logits_and_greedy_tokens(tmp_path):
    hf = bamba(attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    hf.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path)
    attention = ours.config.attention
    assert type(ours) is Mamba2LM and ours.config.attn_layer_idx == [1]
    assert (attention.rotary_emb_dim, attention.rotary_emb_base, attention.qkv_proj_bias) == (4, 500.0, True)
    check_same_model(ours, hf)


@pytest.mark.parametrize("kind", ["jamba", "bamba"])
def test_an_hf_save_of_a_hybrid_loads_in_transformers_with_the_same_logits(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    hf = jamba(seed=3) if kind == "jamba" else bamba(seed=3)
    hf.save_pretrained(tmp_path / "theirs")
    ours = AutoModel.from_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours", format="hf")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == kind
    cls = transformers.JambaForCausalLM if kind == "jamba" else transformers.BambaForCausalLM
    back, info = cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info  # every key read, none missing or unexpected
    ids = ids_of()
    torch.testing.assert_close(logits_of(back.eval(), ids), logits_of(hf, ids), rtol=0, atol=0)
    assert AutoModel.from_pretrained(tmp_path / "ours").config == ours.config


def test_jamba_experts_stacked_in_one_tensor_load_too(tmp_path):
    """Jamba's experts as transformers holds them in memory (gate_up_proj (E, 2I, d), gate first;
    down_proj (E, d, I)), the layout of its state_dict()."""
    from safetensors.torch import save_file
    hf = jamba(seed=5)
    hf.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in state
    os.remove(tmp_path / "model.safetensors")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(logits_of(AutoModel.from_pretrained(tmp_path), ids_of()), logits_of(hf, ids_of()),
                               rtol=1e-4, atol=1e-4)


REFUSED_HF = {
    "jamba_attention_not_periodic": (dict(layer="mamba", n_layer=4, inner_norms=True, d_intermediate=24,
                                          attn_layer_idx=[0, 1, 3], attn_cfg={"num_heads": 4}), "attn_layer_idx"),
    "jamba_without_inner_norms": (dict(layer="mamba", d_intermediate=24), "inner_norms"),
    "jamba_rotary": (dict(layer="mamba", inner_norms=True, d_intermediate=24, attn_layer_idx=[1],
                          attn_cfg={"num_heads": 4, "rotary_emb_dim": 4}), "rotary_emb_dim"),
    "bamba_without_mlp": (dict(layer="mamba2", attn_layer_idx=[1], attn_cfg={"num_heads": 4}), "d_intermediate"),
    "bamba_window": (dict(layer="mamba2", d_intermediate=24, attn_layer_idx=[1],
                          attn_cfg={"num_heads": 4, "window_size": 8}), "window_size"),
    "bamba_experts": (dict(layer="mamba2", d_intermediate=24, num_experts=2, num_experts_per_tok=1,
                           moe_layer_idx=[0]), "moe_layer_idx"),
}


@pytest.mark.parametrize("fields,named", list(REFUSED_HF.values()), ids=list(REFUSED_HF))
def test_what_jamba_and_bamba_cannot_hold_is_refused_before_writing(tmp_path, fields, named):
    with pytest.raises(ValueError, match=named):
        model_of(**fields).save_pretrained(tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()


def test_transformers_hybrid_configs_with_fields_mambakit_cannot_represent_are_refused():
    base = {"model_type": "jamba", "hidden_size": D_MODEL, "num_hidden_layers": 2, "vocab_size": VOCAB,
            "num_attention_heads": 4}
    with pytest.raises(ValueError, match="hidden_act"):
        MambaConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="unknown_field"):
        MambaConfig.from_hf({**base, "unknown_field": 1})
    with pytest.raises(ValueError, match="attn_layer_offset"):
        MambaConfig.from_hf({**base, "attn_layer_period": 2, "attn_layer_offset": 2})
    bamba_base = {"model_type": "bamba", "hidden_size": D_MODEL, "num_hidden_layers": 2, "vocab_size": VOCAB,
                  "mamba_n_heads": 4, "num_attention_heads": 4}
    with pytest.raises(ValueError, match="time_step_limit"):
        MambaConfig.from_hf({**bamba_base, "time_step_limit": [0.0, 1.0]})
    with pytest.raises(ValueError, match="mlp_bias"):
        MambaConfig.from_hf({**bamba_base, "mlp_bias": True})
