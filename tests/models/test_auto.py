"""AutoModel picks the class a checkpoint's config.json asks for (Mamba2LM for Mamba-2, MambaLM
for Mamba-1) in each of the three formats and from the local Hugging Face cache, and refuses
every other architecture by naming config.json and what it holds; Mamba2LM refuses Mamba-1
checkpoints and configs and names the class to use."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mambakit import AutoModel, Mamba2LM, MambaConfig, MambaLM
from tests.checkpoint import test_checkpoint
from tests.checkpoint.weights import randomize_

hub_cache = test_checkpoint.hub_cache  # the fixture: a local Hugging Face cache

VOCAB = 64
CONFIGS = {
    "mamba": MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8),
    "mamba2": MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, layer="mamba2", d_state=8, headdim=16, ngroups=2,
                          chunk_size=4),
}
CLASSES = {"mamba": MambaLM, "mamba2": Mamba2LM}


def model_of(layer: str) -> MambaLM:
    return randomize_(CLASSES[layer](CONFIGS[layer]), seed=3).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def write_config(directory, raw: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("fmt", ["mambakit", "hf", "official"])
@pytest.mark.parametrize("layer", ["mamba", "mamba2"])
def test_auto_model_builds_the_class_of_each_format(tmp_path, layer, fmt):
    model = model_of(layer)
    model.save_pretrained(tmp_path, format=fmt)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is CLASSES[layer] and loaded.config.layer == layer
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(ids()), model(ids()))


def test_auto_model_passes_device_and_dtype(tmp_path):
    model_of("mamba2").save_pretrained(tmp_path, format="hf")
    loaded = AutoModel.from_pretrained(tmp_path, device="cpu", dtype=torch.float64)
    assert type(loaded) is Mamba2LM and loaded.lm_head.weight.dtype == torch.float64


def test_auto_model_reads_a_hub_id_in_the_local_cache(hub_cache):
    commit = hashlib.sha1(b"mambakit auto snapshot").hexdigest()
    repo = hub_cache / "models--org--mamba2"
    model_of("mamba2").save_pretrained(repo / "snapshots" / commit, format="official")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert type(AutoModel.from_pretrained("org/mamba2")) is Mamba2LM
    with pytest.raises(FileNotFoundError, match="org/other"):
        AutoModel.from_pretrained("org/other")


# configs of architectures that mambakit cannot build (hybrids it can are in
# tests/checkpoint/test_hybrid_formats.py), and what the message must name
UNKNOWN = {
    "official_attention_not_causal": ({"d_model": 32, "n_layer": 2, "vocab_size": VOCAB,
                                       "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [1],
                                       "attn_cfg": {"num_heads": 4}}, "attn_cfg.causal"),
    "official_mlp_inside_attention": ({"d_model": 32, "n_layer": 2, "vocab_size": VOCAB,
                                       "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [1],
                                       "attn_cfg": {"num_heads": 4, "causal": True, "mlp_dim": 64}}, "mlp_dim"),
    "official_mamba3": ({"d_model": 32, "n_layer": 2, "vocab_size": VOCAB, "ssm_cfg": {"layer": "Mamba3"}},
                        "Mamba3"),
    "hf_jamba_sliding_window": ({"model_type": "jamba", "architectures": ["JambaForCausalLM"], "hidden_size": 32,
                                 "num_hidden_layers": 2, "vocab_size": VOCAB, "sliding_window": 16},
                                "sliding_window"),
    "hf_bamba_scaled_rope": ({"model_type": "bamba", "vocab_size": VOCAB, "rope_parameters": {"rope_type": "yarn"}},
                             "rope_type"),
    "mambakit_unknown_layer": ({"format": "mambakit", "d_model": 32, "n_layer": 2, "vocab_size": VOCAB,
                                "layer": "mamba3"}, "mamba3"),
}


@pytest.mark.parametrize("raw,named", list(UNKNOWN.values()), ids=list(UNKNOWN))
def test_auto_model_refuses_an_unknown_architecture_by_name(tmp_path, raw, named):
    write_config(tmp_path, raw)
    with pytest.raises(ValueError) as excinfo:
        AutoModel.from_pretrained(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "config.json") in message and named in message, message


@pytest.mark.parametrize("fmt", ["mambakit", "hf", "official"])
def test_mamba2_lm_refuses_a_mamba1_checkpoint(tmp_path, fmt):
    model_of("mamba").save_pretrained(tmp_path, format=fmt)
    with pytest.raises(ValueError) as excinfo:
        Mamba2LM.from_pretrained(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "config.json") in message, message
    assert "MambaLM.from_pretrained" in message and "AutoModel.from_pretrained" in message, message


def test_mamba2_lm_refuses_a_mamba1_config():
    with pytest.raises(ValueError, match="layer='mamba2'"):
        Mamba2LM(CONFIGS["mamba"])
    with pytest.raises(TypeError, match="MambaConfig"):
        Mamba2LM({"layer": "mamba2"})


def test_mamba2_lm_is_a_mamba_lm_with_mamba2_mixers():
    model = Mamba2LM(CONFIGS["mamba2"])
    assert isinstance(model, MambaLM) and AutoModel.class_for(CONFIGS["mamba2"]) is Mamba2LM
    assert AutoModel.class_for(CONFIGS["mamba"]) is MambaLM
    with pytest.raises(TypeError):
        AutoModel()
