"""Checkpoints: agreement with transformers' MambaForCausalLM (a peer implementation), round
trips of the three formats, sharded and .bin weights, the local Hugging Face cache, strict
loading errors, atomic writes and stale weight files."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit import MambaConfig, MambaLM
from tests.checkpoint.weights import randomize_

VOCAB, D_MODEL, N_LAYER, D_STATE = 96, 32, 2, 8
WEIGHT_NAMES = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"}


# ---- helpers ---------------------------------------------------------------------------------

def small_config(**overrides) -> MambaConfig:
    return MambaConfig(**{"d_model": D_MODEL, "n_layer": N_LAYER, "d_state": D_STATE, "vocab_size": VOCAB,
                          **overrides})


def small_model(seed: int = 1, **overrides) -> MambaLM:
    return randomize_(MambaLM(small_config(**overrides)), seed).eval()


def random_ids(batch: int = 2, length: int = 13, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_model(seed: int = 0, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, state_size=D_STATE,
                                      num_hidden_layers=N_LAYER, expand=2, conv_kernel=4, **overrides)
    return randomize_(transformers.MambaForCausalLM(config), seed + 1000).eval()


def snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def shard_by_hand(directory, n_shards: int = 2) -> list[str]:
    """Replaces directory/model.safetensors by n_shards shards and a model.safetensors.index.json."""
    state = load_file(str(directory / "model.safetensors"))
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::n_shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "model.safetensors").unlink()
    return names


# ---- agreement with transformers -------------------------------------------------------------

HF_VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "in_out_proj_bias": {"use_bias": True},
    "no_conv_bias": {"use_conv_bias": False},
    "untied_bias_no_conv_bias": {"tie_word_embeddings": False, "use_bias": True, "use_conv_bias": False},
}


@pytest.mark.parametrize("overrides", list(HF_VARIANTS.values()), ids=list(HF_VARIANTS))
def test_transformers_checkpoint_loads_and_hf_save_loads_in_transformers(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    ids = random_ids()
    expected = logits_of(hf, ids)

    ours = MambaLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.config.bias == hf.config.use_bias and ours.config.conv_bias == hf.config.use_conv_bias
    torch.testing.assert_close(logits_of(ours, ids), expected, atol=1e-4, rtol=0)

    # prefill + one step() per token (the decoding path) agrees with the peer's full forward
    with torch.no_grad():
        last, cache = ours.prefill(ids[:, :5])
        stepped = [last]
        for t in range(5, ids.shape[1]):
            stepped.append(ours.step(ids[:, t], cache))
    torch.testing.assert_close(torch.stack(stepped, 1), expected[:, 4:], atol=1e-4, rtol=0)

    ours.save_pretrained(tmp_path / "back", format="hf")
    back, info = transformers.MambaForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    torch.testing.assert_close(logits_of(back.eval(), ids), expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path):
    hf = hf_model(seed=3)
    hf.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path).eval()
    prompt = random_ids(batch=2, length=6, seed=7)
    got = ours.generate(prompt, max_new_tokens=6)
    seq = prompt
    with torch.no_grad():  # the peer's greedy decoding, by full forward passes
        for _ in range(6):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


# ---- round trips of our own formats ----------------------------------------------------------

ROUND_TRIP_CONFIGS = {
    "tied": {},
    "untied": {"tie_embeddings": False},
    "layernorm_bias_dt_rank": {"rms_norm": False, "bias": True, "conv_bias": False, "dt_rank": 5},
    "padded_vocab": {"vocab_size": 90, "residual_in_fp32": False, "d_conv": 3, "expand": 3},
}


@pytest.mark.parametrize("overrides", list(ROUND_TRIP_CONFIGS.values()), ids=list(ROUND_TRIP_CONFIGS))
def test_official_round_trip(tmp_path, overrides):
    model = small_model(**overrides)
    model.save_pretrained(tmp_path, format="official")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]

    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                "pad_vocab_size_multiple", "tie_embeddings"):
        assert key in raw, key
    assert (raw["d_model"], raw["n_layer"], raw["vocab_size"]) == (D_MODEL, N_LAYER, model.config.vocab_size)
    assert raw["ssm_cfg"]["d_state"] == D_STATE and raw["tie_embeddings"] == model.config.tie_embeddings
    assert "hidden_size" not in raw and "format" not in raw

    state = torch.load(tmp_path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    mixer = ["A_log", "D", "in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
             "out_proj.weight"]
    mixer += ["in_proj.bias", "out_proj.bias"] if model.config.bias else []
    mixer += ["conv1d.bias"] if model.config.conv_bias else []
    norm = ["weight", "bias"] if not model.config.rms_norm else ["weight"]
    official = {"backbone.embedding.weight", "lm_head.weight", *(f"backbone.norm_f.{n}" for n in norm)}
    for i in range(N_LAYER):
        official |= {f"backbone.layers.{i}.mixer.{n}" for n in mixer}
        official |= {f"backbone.layers.{i}.norm.{n}" for n in norm}
    assert set(state) == official
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    back = MambaLM.from_pretrained(tmp_path).eval()
    assert back.config == model.config
    ids = random_ids()
    assert torch.equal(logits_of(back, ids), logits_of(model, ids))


@pytest.mark.parametrize("overrides", list(ROUND_TRIP_CONFIGS.values()) + [{"norm_epsilon": 1e-3}],
                         ids=list(ROUND_TRIP_CONFIGS) + ["norm_epsilon"])
def test_mambakit_round_trip(tmp_path, overrides):
    model = small_model(**overrides)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["format"] == "mambakit"
    # official key names inside, with the tied lm_head left out
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "backbone.embedding.weight" in keys and "backbone.layers.0.mixer.A_log" in keys
    assert ("lm_head.weight" in keys) == (not model.config.tie_embeddings)

    back = MambaLM.from_pretrained(tmp_path).eval()
    assert back.config == model.config
    ids = random_ids()
    assert torch.equal(logits_of(back, ids), logits_of(model, ids))
    if not model.config.tie_embeddings:
        assert back.lm_head.weight.data_ptr() != back.backbone.embedding.weight.data_ptr()


def test_official_format_refuses_a_config_it_cannot_express(tmp_path):
    """mamba_ssm's config has no norm_epsilon (its models use 1e-5): a model with another
    epsilon must not be written as one that loads back with 1e-5 and different outputs."""
    model = small_model(norm_epsilon=1e-3)
    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(ValueError, match="norm_epsilon"):
        model.save_pretrained(tmp_path, format="official")
    assert os.listdir(tmp_path) == ["keep.txt"]  # nothing half-written


def test_hf_save_writes_hf_names(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path, format="hf")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "mamba" and raw["hidden_size"] == D_MODEL and raw["state_size"] == D_STATE
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "backbone.embeddings.weight" in keys and "backbone.embedding.weight" not in keys
    ids = random_ids()
    assert torch.equal(logits_of(MambaLM.from_pretrained(tmp_path).eval(), ids), logits_of(model, ids))


# ---- sharded and .bin weights ----------------------------------------------------------------

def test_sharded_safetensors_from_transformers(tmp_path):
    hf = hf_model(seed=5, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [n for n in os.listdir(tmp_path) if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ids = random_ids()
    ours = MambaLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(ours, ids), logits_of(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["mambakit", "hf"])
def test_sharded_safetensors_by_hand(tmp_path, fmt):
    model = small_model(tie_embeddings=False)
    model.save_pretrained(tmp_path, format=fmt)
    shards = shard_by_hand(tmp_path, n_shards=3)
    assert all(load_file(str(tmp_path / s)) for s in shards)  # every shard holds some keys
    ids = random_ids()
    assert torch.equal(logits_of(MambaLM.from_pretrained(tmp_path).eval(), ids), logits_of(model, ids))


def test_sharded_bin_by_hand(tmp_path):
    model = small_model(tie_embeddings=False)
    model.save_pretrained(tmp_path, format="official")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    (tmp_path / "pytorch_model.bin").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, name in enumerate(["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]):
        part = {k: state[k] for k in keys[i::2]}
        torch.save(part, tmp_path / name)
        weight_map.update({k: name for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = random_ids()
    assert torch.equal(logits_of(MambaLM.from_pretrained(tmp_path).eval(), ids), logits_of(model, ids))


EXECUTED: list[str] = []


def _record(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class Payload:
    """Unpickling this calls _record: code execution, which weights_only loading must refuse."""

    def __reduce__(self):
        return (_record, ("payload ran",))


def test_bin_is_loaded_weights_only(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path, format="official")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["backbone.extra"] = Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")

    EXECUTED.clear()
    with pytest.raises(ValueError, match="(?i)weights.only") as excinfo:
        MambaLM.from_pretrained(tmp_path)
    assert "pytorch_model.bin" in str(excinfo.value) and "_record" in str(excinfo.value)  # the file, the global refused
    assert EXECUTED == []
    # the payload is live: a full unpickle does run it
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert EXECUTED == ["payload ran"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_plain_hf_pytorch_model_bin_loads(tmp_path, tied):
    hf = hf_model(seed=9, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 writes safetensors only
    (tmp_path / "model.safetensors").unlink()
    ids = random_ids()
    ours = MambaLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(ours, ids), logits_of(hf, ids), atol=1e-4, rtol=0)


# ---- the local Hugging Face cache ------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    workdir = tmp_path / "cwd"  # so that no relative path "org/name" exists by accident
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return cache


def test_hub_id_not_in_cache_raises_file_not_found(hub_cache):
    with pytest.raises(FileNotFoundError) as excinfo:
        MambaLM.from_pretrained("nobody/no-such-model")
    message = str(excinfo.value)
    assert "nobody/no-such-model" in message
    assert str(hub_cache) in message  # names where it looked


def test_hub_id_in_local_cache_loads(tmp_path, hub_cache):
    model = small_model(seed=11)
    commit = hashlib.sha1(b"mambakit test snapshot").hexdigest()
    repo = hub_cache / "models--org--name"
    snapshot_dir = repo / "snapshots" / commit
    model.save_pretrained(snapshot_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    loaded = MambaLM.from_pretrained("org/name").eval()
    ids = random_ids()
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    with pytest.raises(FileNotFoundError, match="org/other"):
        MambaLM.from_pretrained("org/other")


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    small_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        MambaLM.from_pretrained(tmp_path / "model.safetensors")


# ---- strict loading --------------------------------------------------------------------------

def _edit_missing(state):
    del state["backbone.layers.1.mixer.D"]
    return ["backbone.layers.1.mixer.D"]


def _edit_unexpected(state):
    state["backbone.layers.0.mixer.surplus"] = torch.zeros(3)
    return ["backbone.layers.0.mixer.surplus"]


def _edit_shape(state):
    state["backbone.layers.0.mixer.A_log"] = state["backbone.layers.0.mixer.A_log"][:, :5].contiguous()
    return ["backbone.layers.0.mixer.A_log", f"({2 * D_MODEL}, 5)", f"({2 * D_MODEL}, {D_STATE})"]


def _edit_all(state):
    return _edit_missing(state) + _edit_unexpected(state) + _edit_shape(state)


def _edit_untied_head_missing(state):  # the model is untied here
    del state["lm_head.weight"]
    return ["lm_head.weight"]


EDITS = {"missing": (_edit_missing, True), "unexpected": (_edit_unexpected, True), "shape": (_edit_shape, True),
         "all_three": (_edit_all, True), "untied_lm_head_missing": (_edit_untied_head_missing, False)}


@pytest.mark.parametrize("edit,tied", list(EDITS.values()), ids=list(EDITS))
def test_mismatched_checkpoint_names_every_problem(tmp_path, edit, tied):
    small_model(tie_embeddings=tied).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    fragments = edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as excinfo:
        MambaLM.from_pretrained(tmp_path)
    assert type(excinfo.value) is ValueError
    for fragment in fragments:
        assert fragment in str(excinfo.value)


def test_tied_config_with_a_different_lm_head_is_rejected(tmp_path):
    small_model(tie_embeddings=True).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state["backbone.embedding.weight"] + 1
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="ties lm_head.*lm_head.weight differs"):
        MambaLM.from_pretrained(tmp_path)


# ---- atomic writes and stale files -----------------------------------------------------------

def _failing_writer(real):
    """Wraps a save function so that it writes part of the file, then fails."""
    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("simulated: disk full")
    return write


@pytest.mark.parametrize("fmt", ["mambakit", "hf", "official"])
def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch, fmt):
    import safetensors.torch
    old = small_model(seed=1)
    old.save_pretrained(tmp_path, format=fmt)
    before = snapshot(tmp_path)
    if fmt == "official":
        monkeypatch.setattr(torch, "save", _failing_writer(torch.save))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer(safetensors.torch.save_file))
    with pytest.raises(OSError, match="simulated"):
        small_model(seed=2).save_pretrained(tmp_path, format=fmt)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # same names (no temp file left) and same bytes
    ids = random_ids()
    assert torch.equal(logits_of(MambaLM.from_pretrained(tmp_path).eval(), ids), logits_of(old, ids))


def test_failed_config_write_leaves_old_config_and_no_temp_file(tmp_path, monkeypatch):
    small_model(seed=1).save_pretrained(tmp_path)
    config_before = (tmp_path / "config.json").read_bytes()
    real_dump = json.dump

    def failing_dump(obj, f, *args, **kwargs):
        f.write('{"d_model": ')
        raise OSError("simulated: disk full")
    monkeypatch.setattr(json, "dump", failing_dump)
    new = small_model(seed=2)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(tmp_path)
    monkeypatch.setattr(json, "dump", real_dump)
    assert (tmp_path / "config.json").read_bytes() == config_before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    MambaLM.from_pretrained(tmp_path)  # still a loadable checkpoint


def _save_first(kind, model, directory):
    if kind == "hf_sharded":
        model.save_pretrained(directory, format="hf")
        shard_by_hand(directory)
    else:
        model.save_pretrained(directory, format=kind)


OVERWRITES = [("hf", "official"), ("mambakit", "official"), ("official", "hf"), ("official", "mambakit"),
              ("hf_sharded", "mambakit"), ("hf_sharded", "official"), ("hf", "mambakit")]


@pytest.mark.parametrize("first,second", OVERWRITES, ids=[f"{a}-then-{b}" for a, b in OVERWRITES])
def test_save_over_another_format_loads_the_new_weights(tmp_path, first, second):
    old, new = small_model(seed=1), small_model(seed=2)
    _save_first(first, old, tmp_path)
    new.save_pretrained(tmp_path, format=second)
    weight_files = WEIGHT_NAMES & set(os.listdir(tmp_path))
    assert weight_files == {"pytorch_model.bin" if second == "official" else "model.safetensors"}
    ids = random_ids()
    got = logits_of(MambaLM.from_pretrained(tmp_path).eval(), ids)
    assert torch.equal(got, logits_of(new, ids))
    assert not torch.equal(got, logits_of(old, ids))


def test_saving_into_a_new_nested_directory(tmp_path):
    model = small_model()
    target = tmp_path / "a" / "b"
    model.save_pretrained(target, format="official")
    ids = random_ids()
    assert torch.equal(logits_of(MambaLM.from_pretrained(target).eval(), ids), logits_of(model, ids))


@pytest.mark.parametrize("fmt", ["mambakit", "hf", "official"])
def test_saved_files_follow_the_umask(tmp_path, fmt):
    """Atomic writes go through mkstemp (owner-only); the final files get the usual mode."""
    import os
    old = os.umask(0o022)
    try:
        small_model().save_pretrained(tmp_path, format=fmt)
    finally:
        os.umask(old)
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_greedy_ids_equal_transformers_generate(tmp_path):
    """The peer's own MambaForCausalLM.generate (its cache and its decoding loop), greedy."""
    hf = hf_model(seed=5)
    hf.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path).eval()
    prompt = random_ids(batch=2, length=7, seed=11)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
    got = ours.generate(prompt, max_new_tokens=12)
    assert torch.equal(got, theirs)
