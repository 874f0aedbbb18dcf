"""Mamba-2 checkpoints in the three formats: round trips mambakit <-> official <-> hf with the
same logits, agreement with transformers' Mamba2ForCausalLM (a peer implementation) both ways,
the official mamba_ssm layout (config.json fields, ssm_cfg.layer "Mamba2", tensor names and
shapes), and the errors: config sizes that disagree with the weights, and config fields that
mambakit's Mamba-2 cannot represent, each a ValueError naming config.json and the field."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from mambakit import Mamba2LM, MambaConfig, MambaLM
from tests.checkpoint.test_reliability import allocation_limit
from tests.checkpoint.weights import randomize_

VOCAB, D_MODEL, HEADDIM, D_STATE, CHUNK = 100, 64, 16, 16, 8  # d_inner 128: 8 heads
LENGTH = 13  # not a multiple of CHUNK: the last chunk is partial

# the official layout, as mamba_ssm 2.x defines it: MambaConfig's fields (models/config_mamba.py),
# the keyword arguments of its Mamba2 mixer (modules/mamba2.py; "layer" is popped by create_block)
OFFICIAL_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                          "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                          "tie_embeddings"}
OFFICIAL_MAMBA2_KWARGS = {"layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups",
                          "A_init_range", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max",
                          "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size", "use_mem_eff_path"}


# ---- helpers ---------------------------------------------------------------------------------

def small_config(**overrides) -> MambaConfig:
    return MambaConfig(**{"d_model": D_MODEL, "n_layer": 2, "vocab_size": VOCAB, "layer": "mamba2",
                          "headdim": HEADDIM, "d_state": D_STATE, "ngroups": 2, "chunk_size": CHUNK, **overrides})


def small_model(seed: int = 1, **overrides) -> Mamba2LM:
    return randomize_(Mamba2LM(small_config(**overrides)), seed).eval()


def random_ids(batch: int = 2, length: int = LENGTH, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_model(seed: int = 0, ngroups: int = 2, **overrides):
    """transformers' Mamba2ForCausalLM with random weights; no special tokens, so that its
    generate stops nowhere."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2, state_size=D_STATE, expand=2,
        num_heads=2 * D_MODEL // HEADDIM, head_dim=HEADDIM, n_groups=ngroups, conv_kernel=4, chunk_size=CHUNK,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, **overrides)
    return randomize_(transformers.Mamba2ForCausalLM(config), seed + 1000).eval()


@torch.no_grad()
def greedy_of_transformers(hf, prompt: torch.Tensor, new: int) -> torch.Tensor:
    return hf.generate(prompt, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(prompt))


def edit_config(directory, path: tuple[str, ...], value) -> None:
    raw = json.loads((directory / "config.json").read_text())
    holder = raw
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    (directory / "config.json").write_text(json.dumps(raw))


# ---- round trips -----------------------------------------------------------------------------

ROUND_TRIP_CONFIGS = {
    "one_group_tied": {"ngroups": 1},
    "two_groups_untied_bias": {"ngroups": 2, "tie_embeddings": False, "bias": True, "conv_bias": False},
    "layernorm_padded_vocab": {"ngroups": 4, "rms_norm": False, "residual_in_fp32": False, "d_conv": 3},
}


@pytest.mark.parametrize("overrides", list(ROUND_TRIP_CONFIGS.values()), ids=list(ROUND_TRIP_CONFIGS))
def test_round_trip_through_every_format_keeps_the_logits(tmp_path, overrides):
    model = small_model(**overrides)
    ids = random_ids()
    expected = logits_of(model, ids)
    chain = ["mambakit", "official", "hf", "mambakit", "hf", "official"]
    if not model.config.rms_norm:  # transformers' Mamba-2 has RMSNorm only
        chain = ["mambakit", "official", "mambakit", "official"]
    current = model
    for step, fmt in enumerate(chain):
        current.save_pretrained(tmp_path / f"{step}-{fmt}", format=fmt)
        current = Mamba2LM.from_pretrained(tmp_path / f"{step}-{fmt}")
        assert type(current) is Mamba2LM
        for field in ("layer", "headdim", "ngroups", "d_state", "chunk_size", "tie_embeddings", "bias", "rms_norm"):
            assert getattr(current.config, field) == getattr(model.config, field), (fmt, field)
        assert torch.equal(logits_of(current, ids), expected), fmt


def test_hf_save_refuses_layernorm_and_official_save_refuses_another_epsilon(tmp_path):
    with pytest.raises(ValueError, match="RMSNorm only"):
        small_model(rms_norm=False).save_pretrained(tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="norm_epsilon=1e-5 only"):
        small_model(norm_epsilon=1e-6).save_pretrained(tmp_path / "official", format="official")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "official").exists()


# ---- the official layout ---------------------------------------------------------------------

def test_official_save_has_the_official_layout(tmp_path):
    model = small_model(ngroups=2)
    model.save_pretrained(tmp_path, format="official")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]

    raw = json.loads((tmp_path / "config.json").read_text())
    assert set(raw) == OFFICIAL_CONFIG_FIELDS
    assert (raw["d_intermediate"], raw["attn_layer_idx"], raw["attn_cfg"]) == (0, [], {})
    assert (raw["d_model"], raw["n_layer"], raw["vocab_size"]) == (D_MODEL, 2, VOCAB)
    ssm_cfg = raw["ssm_cfg"]
    assert ssm_cfg["layer"] == "Mamba2" and set(ssm_cfg) <= OFFICIAL_MAMBA2_KWARGS
    assert (ssm_cfg["headdim"], ssm_cfg["ngroups"], ssm_cfg["d_state"], ssm_cfg["chunk_size"]) == (
        HEADDIM, 2, D_STATE, CHUNK)

    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    d_inner, heads, groups = 2 * D_MODEL, 2 * D_MODEL // HEADDIM, 2
    conv_dim = d_inner + 2 * groups * D_STATE
    padded = (VOCAB + 7) // 8 * 8
    expected = {"backbone.embedding.weight": (padded, D_MODEL), "backbone.norm_f.weight": (D_MODEL,),
                "lm_head.weight": (padded, D_MODEL)}
    for i in range(2):
        mixer = f"backbone.layers.{i}.mixer."
        expected.update({
            f"backbone.layers.{i}.norm.weight": (D_MODEL,),
            mixer + "in_proj.weight": (2 * d_inner + 2 * groups * D_STATE + heads, D_MODEL),  # z, x, B, C, dt
            mixer + "conv1d.weight": (conv_dim, 1, 4), mixer + "conv1d.bias": (conv_dim,),
            mixer + "dt_bias": (heads,), mixer + "A_log": (heads,), mixer + "D": (heads,),
            mixer + "norm.weight": (d_inner,), mixer + "out_proj.weight": (D_MODEL, d_inner)})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_an_official_config_written_by_mamba_ssm_loads(tmp_path):
    """ssm_cfg as mamba_ssm writes or takes it: keys at their defaults left out or present
    (dt_limit with a bare Infinity, as Python's json writes it), init-only keys present."""
    model = small_model(ngroups=2)
    ids = random_ids()
    model.save_pretrained(tmp_path, format="official")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["ssm_cfg"] = {"layer": "Mamba2", "d_state": D_STATE, "headdim": HEADDIM, "ngroups": 2, "chunk_size": CHUNK,
                      "A_init_range": [1, 16], "use_mem_eff_path": True, "rmsnorm": True, "norm_before_gate": False,
                      "D_has_hdim": False, "d_ssm": None, "dt_limit": [0.0, math.inf]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path), ids), logits_of(model, ids))


def test_an_official_mamba2_config_takes_the_official_mixer_defaults():
    config = MambaConfig.from_official({"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                                        "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
                                        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                                        "pad_vocab_size_multiple": 16, "tie_embeddings": True})
    assert config == MambaConfig.from_name("mamba2-130m")
    assert (config.d_state, config.headdim, config.ngroups, config.chunk_size) == (128, 64, 1, 256)


# ---- agreement with transformers' Mamba2ForCausalLM -------------------------------------------

@pytest.mark.parametrize("ngroups,tied", [(1, False), (2, True), (4, False)])
def test_a_transformers_checkpoint_loads_with_the_same_logits_and_greedy_tokens(tmp_path, ngroups, tied):
    hf = hf_model(seed=ngroups, ngroups=ngroups, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    ours = Mamba2LM.from_pretrained(tmp_path)
    assert (ours.config.ngroups, ours.config.tie_embeddings, ours.config.headdim) == (ngroups, tied, HEADDIM)
    ids = random_ids()
    expected = logits_of(hf, ids)
    torch.testing.assert_close(logits_of(ours, ids), expected, atol=1e-4, rtol=0)

    with torch.no_grad():  # prefill, then one step() per token (the decoding path)
        last, cache = ours.prefill(ids[:, :5])
        stepped = [last] + [ours.step(ids[:, t], cache) for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.stack(stepped, 1), expected[:, 4:], atol=1e-4, rtol=0)

    prompt = random_ids(length=6, seed=7)
    assert torch.equal(ours.generate(prompt, max_new_tokens=20, temperature=0.0),
                       greedy_of_transformers(hf, prompt, 20))


@pytest.mark.parametrize("ngroups,tied", [(1, True), (2, False)])
def test_an_hf_save_loads_in_transformers_with_the_same_logits_and_greedy_tokens(tmp_path, ngroups, tied):
    transformers = pytest.importorskip("transformers")
    # a vocabulary of the padded size: transformers' vocab_size is the embedding's (104), and
    # its generate would pick a padding row that mambakit's, which knows the vocabulary, never does
    ours = small_model(seed=ngroups + 10, ngroups=ngroups, tie_embeddings=tied, vocab_size=104)
    ours.save_pretrained(tmp_path, format="hf")
    hf, info = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (hf.config.n_groups, hf.config.head_dim, hf.config.tie_word_embeddings) == (ngroups, HEADDIM, tied)
    ids = random_ids()
    torch.testing.assert_close(logits_of(hf.eval(), ids), logits_of(ours, ids), atol=1e-4, rtol=0)

    prompt = random_ids(length=6, seed=8)
    assert torch.equal(greedy_of_transformers(hf, prompt, 20),
                       ours.generate(prompt, max_new_tokens=20, temperature=0.0))


def test_fields_older_transformers_wrote_and_never_read_are_accepted(tmp_path):
    """transformers 4.4x wrote rms_norm, norm_before_gate (true!) and an unrelated
    intermediate_size into Mamba2Config; its Mamba2 model read none of them (RMSNorm, the gate
    applied before the norm), so they leave the logits as they are."""
    model = small_model()
    ids = random_ids()
    model.save_pretrained(tmp_path, format="hf")
    for key, value in (("rms_norm", True), ("norm_before_gate", True), ("intermediate_size", 14336),
                       ("time_step_rank", 4), ("time_step_limit", [0.0, {"__float__": "Infinity"}])):
        edit_config(tmp_path, (key,), value)
    assert torch.equal(logits_of(Mamba2LM.from_pretrained(tmp_path), ids), logits_of(model, ids))


# ---- errors ----------------------------------------------------------------------------------

# (format, the config path to edit, the value, the field the message must name): sizes within
# bounds whose model does not have the weights' shapes (the weights: headdim 16, ngroups 2, d_state 16)
SIZE_MISMATCHES = {
    "mambakit_headdim": ("mambakit", ("headdim",), 32, "headdim"),
    "mambakit_ngroups": ("mambakit", ("ngroups",), 1, "ngroups"),
    "mambakit_d_state": ("mambakit", ("d_state",), 32, "d_state"),
    "official_headdim": ("official", ("ssm_cfg", "headdim"), 32, "ssm_cfg.headdim"),
    "official_ngroups": ("official", ("ssm_cfg", "ngroups"), 4, "ssm_cfg.ngroups"),
    "official_d_state": ("official", ("ssm_cfg", "d_state"), 8, "ssm_cfg.d_state"),
    "hf_head_dim": ("hf", ("head_dim",), 32, "head_dim"),  # with num_heads 4 (below)
    "hf_n_groups": ("hf", ("n_groups",), 1, "n_groups"),
    "hf_state_size": ("hf", ("state_size",), 128, "state_size"),
}


@pytest.mark.parametrize("fmt,path,value,field", list(SIZE_MISMATCHES.values()), ids=list(SIZE_MISMATCHES))
def test_config_sizes_that_disagree_with_the_weights_name_the_file_and_field(tmp_path, fmt, path, value, field):
    small_model(ngroups=2).save_pretrained(tmp_path, format=fmt)
    edit_config(tmp_path, path, value)
    if path == ("head_dim",):
        edit_config(tmp_path, ("num_heads",), 2 * D_MODEL // value)
    with pytest.raises(ValueError) as excinfo, allocation_limit():
        Mamba2LM.from_pretrained(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "config.json") in message and "does not match the weights" in message, message
    assert "config fields" in message and field in message.split("config fields", 1)[1], message


# (format, the config path to edit, the value, what the message must name): fields that would
# make the peer compute something mambakit's Mamba-2 does not
UNREPRESENTABLE = {
    "hf_time_step_limit": ("hf", ("time_step_limit",), [0.0, 0.5], "time_step_limit"),
    "hf_hidden_act": ("hf", ("hidden_act",), "gelu", "hidden_act"),
    "hf_heads_times_head_dim": ("hf", ("num_heads",), 4, "num_heads"),
    "hf_unknown_field": ("hf", ("attention_layer_indices",), [1], "attention_layer_indices"),
    "hf_quantized": ("hf", ("quantization_config",), {"quant_method": "bitsandbytes"}, "quantization_config"),
    "official_norm_before_gate": ("official", ("ssm_cfg", "norm_before_gate"), True, "norm_before_gate"),
    "official_D_has_hdim": ("official", ("ssm_cfg", "D_has_hdim"), True, "D_has_hdim"),
    "official_no_rmsnorm": ("official", ("ssm_cfg", "rmsnorm"), False, "rmsnorm"),
    "official_d_ssm": ("official", ("ssm_cfg", "d_ssm"), 64, "d_ssm"),
    "official_dt_limit": ("official", ("ssm_cfg", "dt_limit"), [0.0, 0.5], "dt_limit"),
    "official_mamba1_key": ("official", ("ssm_cfg", "dt_rank"), 4, "dt_rank"),
}


@pytest.mark.parametrize("fmt,path,value,field", list(UNREPRESENTABLE.values()), ids=list(UNREPRESENTABLE))
def test_a_config_field_mambakit_cannot_represent_is_named(tmp_path, fmt, path, value, field):
    small_model().save_pretrained(tmp_path, format=fmt)
    edit_config(tmp_path, path, value)
    with pytest.raises(ValueError) as excinfo:
        Mamba2LM.from_pretrained(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "config.json") in message and field in message, message


def test_mamba_lm_loads_mamba2_checkpoints_of_every_format(tmp_path):
    """Code that loads with MambaLM keeps working: a MambaLM with Mamba-2 mixers."""
    model = small_model()
    ids = random_ids()
    for fmt in ("hf", "official"):
        model.save_pretrained(tmp_path / fmt, format=fmt)
        loaded = MambaLM.from_pretrained(tmp_path / fmt)
        assert type(loaded) is MambaLM and loaded.config.layer == "mamba2"
        assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
