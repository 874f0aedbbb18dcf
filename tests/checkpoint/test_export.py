"""Exports that load in their target library with the same outputs: format="hf" read by
transformers' MambaForCausalLM for every preset's shapes (and back), sharded safetensors with an
index (max_shard_size), the model from_pretrained gives in eval mode, and what the loader says
when a checkpoint is not found. The official loader (mamba_ssm) is in test_export_gpu.py."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mambakit import PRESETS, MambaConfig, MambaLM
from mambakit.checkpoint import FORMATS
from tests.checkpoint import test_checkpoint
from tests.checkpoint.test_checkpoint import logits_of, random_ids, small_model, snapshot
from tests.checkpoint.test_reliability import Recorder, load, same_weights
from tests.checkpoint.weights import randomize_constants_

hub_cache = test_checkpoint.hub_cache  # the fixture: an empty local Hugging Face cache, a fresh working directory

INDEX = "model.safetensors.index.json"


# ---- helpers ---------------------------------------------------------------------------------

def ids_for(config: MambaConfig, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(5))


def transformers_load(directory: Path):
    """transformers' MambaForCausalLM.from_pretrained(directory), which must find every weight
    it expects and no other."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.MambaForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_exports_to_transformers(model: MambaLM, directory: Path, **save_options) -> None:
    """model.save_pretrained(format="hf") loads in transformers with every config field read as
    written and the same logits (fp32)."""
    model.save_pretrained(directory, format="hf", **save_options)
    hf = transformers_load(directory)
    raw = json.loads((directory / "config.json").read_text())
    for key, value in raw.items():
        assert getattr(hf.config, key) == value, key
    ids = ids_for(model.config)
    torch.testing.assert_close(logits_of(hf, ids), logits_of(model, ids), atol=1e-4, rtol=0)


def transformers_twin(config: MambaConfig, seed: int = 0):
    """A random transformers MambaForCausalLM of the config's shape (a config born in transformers).
    Its linear layers are drawn with std 0.02 (transformers' default of 0.1 makes the residual
    stream of 24 layers grow so large that fp32 rounding alone moves the logits by 1e-3)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.MambaConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        state_size=config.d_state, expand=config.expand, conv_kernel=config.d_conv, initializer_range=0.02)
    return randomize_constants_(transformers.MambaForCausalLM(hf_config), seed + 1).eval()


# ---- format="hf" in transformers -------------------------------------------------------------

HF_EXPORTS = {
    "tiny": ("tiny", {}),
    "tiny-untied": ("tiny", {"tie_embeddings": False}),
    "tiny-bias-no-conv-bias": ("tiny", {"bias": True, "conv_bias": False}),
    "tiny-epsilon-fp16-residual": ("tiny", {"norm_epsilon": 1e-3, "residual_in_fp32": False}),
    "tiny-padded-vocab-dt-rank": ("tiny", {"vocab_size": 250, "dt_rank": 5, "d_conv": 3, "expand": 3}),
    "tiny-no-rescale-at-init": ("tiny", {"rescale_prenorm_residual": False, "initializer_range": 0.1}),
    "130m": ("130m", {}),
}


@pytest.mark.parametrize("preset,overrides", list(HF_EXPORTS.values()), ids=list(HF_EXPORTS))
def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path, preset, overrides):
    """transformers applies rescale_prenorm_residual to out_proj at every from_pretrained, the
    loaded weights included: an export that says true would be divided by sqrt(n_layer) again."""
    model = randomize_constants_(MambaLM.from_name(preset, **overrides)).eval()
    assert_exports_to_transformers(model, tmp_path)


@pytest.mark.parametrize("preset", ["tiny", "130m"])
def test_transformers_save_loads_in_mambakit_with_equal_logits(tmp_path, preset):
    hf = transformers_twin(PRESETS[preset])
    hf.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path)
    assert (ours.config.d_model, ours.config.n_layer) == (PRESETS[preset].d_model, PRESETS[preset].n_layer)
    ids = ids_for(ours.config)
    torch.testing.assert_close(logits_of(ours, ids), logits_of(hf, ids), atol=1e-4, rtol=0)


FULL_DEPTH_TESTED = {preset for preset, _ in HF_EXPORTS.values()}  # tiny and 130m, whole, above
# the Mamba-1 presets: the Hugging Face Mamba format holds no Mamba-2 mixer
MAMBA1_PRESETS = {name for name, config in PRESETS.items() if config.layer == "mamba"}


@pytest.mark.parametrize("preset", sorted(MAMBA1_PRESETS - FULL_DEPTH_TESTED))
def test_every_preset_shape_exports_to_transformers(tmp_path, preset):
    """Each other preset's layer shapes, with n_layer reduced to 2 and the vocabulary to 1001
    (padded to 1008) so that the test stays small and fast: the same logits in transformers."""
    config = MambaConfig.from_name(preset, n_layer=2, vocab_size=1001)
    assert_exports_to_transformers(randomize_constants_(MambaLM(config)).eval(), tmp_path)


def _available_memory() -> int:
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


FULL_PRESETS = sorted(MAMBA1_PRESETS - FULL_DEPTH_TESTED)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MAMBAKIT_TEST_FULL_PRESETS") != "1",
                    reason="full-depth presets take minutes and up to ~30 GB; set MAMBAKIT_TEST_FULL_PRESETS=1")
@pytest.mark.parametrize("preset", FULL_PRESETS)
def test_full_depth_preset_exports_to_transformers(tmp_path, preset):
    """The whole preset, fp32, saved with the default max_shard_size (2.8b: three 5GB shards)."""
    n_params = sum(p.numel() for p in MambaLM.from_name(preset, device="meta").parameters())
    if _available_memory() < 3 * 4 * n_params:  # ours, transformers' copy, and room for the files
        pytest.skip(f"{preset} needs about {3 * 4 * n_params / 1e9:.0f} GB of free memory")
    model = randomize_constants_(MambaLM.from_name(preset)).eval()
    assert_exports_to_transformers(model, tmp_path)


# ---- format="official" (mamba_ssm itself loads it in test_export_gpu.py) ----------------------

# mamba_ssm's MambaLMHeadModel.from_pretrained calls MambaConfig(**config.json) and builds each
# layer with Mamba(**ssm_cfg): an unknown key is a TypeError there. MambaConfig's fields in 1.2.x,
# those 2.x added (with defaults that mean a pure Mamba-1 model), and Mamba's keyword arguments:
OFFICIAL_FIELDS_1_2 = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                       "pad_vocab_size_multiple", "tie_embeddings"}
OFFICIAL_FIELDS_2 = OFFICIAL_FIELDS_1_2 | {"d_intermediate", "attn_layer_idx", "attn_cfg"}
MAMBA1_ARGUMENTS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                    "dt_init_floor", "conv_bias", "bias", "use_fast_path"}


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "rms_norm": False, "dt_rank": 5}])
def test_the_official_config_is_one_that_mamba_ssm_1_2_and_2_x_both_read(tmp_path, overrides):
    model = small_model(**overrides)
    model.save_pretrained(tmp_path, format="official")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert set(raw) == OFFICIAL_FIELDS_1_2 and set(raw) <= OFFICIAL_FIELDS_2
    assert set(raw["ssm_cfg"]) <= MAMBA1_ARGUMENTS
    assert raw["fused_add_norm"] is True and raw["pad_vocab_size_multiple"] == model.config.pad_vocab_size_multiple
    back = MambaLM.from_pretrained(tmp_path)
    assert back.config == model.config


# ---- sharded safetensors ---------------------------------------------------------------------

def shard_names(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("model-") and n.endswith(".safetensors"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("fmt", ["mambakit", "hf"])
def test_a_small_max_shard_size_writes_shards_and_an_index_that_load(tmp_path, fmt, tied):
    model = small_model(tie_embeddings=tied)
    model.save_pretrained(tmp_path, format=fmt, max_shard_size="20KB")
    shards = shard_names(tmp_path)
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", INDEX, *shards])

    index = json.loads((tmp_path / INDEX).read_text())
    tensors = {}
    for shard in shards:
        part = load_file(str(tmp_path / shard))
        assert part and (sum(t.nbytes for t in part.values()) <= 20_000 or len(part) == 1), shard
        assert all(index["weight_map"][key] == shard for key in part)
        tensors.update(part)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert ("lm_head.weight" in tensors) == (not tied)

    back = MambaLM.from_pretrained(tmp_path)
    ids = random_ids()
    assert torch.equal(logits_of(back, ids), logits_of(model, ids))
    if fmt == "hf":
        torch.testing.assert_close(logits_of(transformers_load(tmp_path), ids), logits_of(model, ids),
                                   atol=1e-4, rtol=0)
    else:
        assert back.config == model.config


def written_files(directory: Path, max_shard_size) -> dict[str, bytes]:
    small_model(tie_embeddings=False).save_pretrained(directory, max_shard_size=max_shard_size)
    return snapshot(directory)


@pytest.mark.parametrize("same_as,sizes", [
    (20_000, ["20KB", "20kb", " 20 KB ", "0.02MB", "20000B"]),
    (20_480, ["20KiB", "20kib", "0.01953125MiB"]),
])
def test_max_shard_size_takes_bytes_or_a_size_with_a_unit(tmp_path, same_as, sizes):
    expected = written_files(tmp_path / "bytes", same_as)
    assert len(expected) > 3
    for i, size in enumerate(sizes):
        assert written_files(tmp_path / str(i), size) == expected, size


@pytest.mark.parametrize("size", [None, "5GB", 10**9, "1GiB"])
def test_weights_below_max_shard_size_are_one_model_safetensors(tmp_path, size):
    small_model().save_pretrained(tmp_path, format="hf", max_shard_size=size)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "", "abc", "5", "5XB", "GB", "-5GB", "0KB", "5 G B", [5]])
def test_an_invalid_max_shard_size_is_a_value_error_naming_it(tmp_path, bad):
    small_model(seed=1).save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="max_shard_size"):
        small_model(seed=2).save_pretrained(tmp_path, format="hf", max_shard_size=bad)
    assert snapshot(tmp_path) == before  # the old checkpoint, untouched


def test_the_official_format_is_one_pytorch_model_bin_and_takes_no_max_shard_size(tmp_path):
    """mamba_ssm's MambaLMHeadModel.from_pretrained reads pytorch_model.bin only."""
    with pytest.raises(ValueError, match="max_shard_size.*official|official.*max_shard_size"):
        small_model().save_pretrained(tmp_path, format="official", max_shard_size="20KB")
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


@pytest.mark.parametrize("renamable", [True, False], ids=["swapped", "switched-in-place"])
def test_switching_between_shards_and_one_file_leaves_no_stale_weights(tmp_path, monkeypatch, renamable):
    """Each save replaces every weight file of the one before (more shards, fewer shards, one
    file, another format) and keeps the directory's other files."""
    if not renamable:
        from mambakit.checkpoint import files
        monkeypatch.setattr(files, "_can_rename", lambda target: False)
    target = tmp_path / "ckpt"
    saves = [("mambakit", "15KB"), ("mambakit", None), ("hf", "40KB"), ("hf", "15KB"), ("official", None),
             ("mambakit", "40KB"), ("hf", None)]
    for seed, (fmt, size) in enumerate(saves):
        model = small_model(seed=seed, tie_embeddings=False)
        model.save_pretrained(target, format=fmt, max_shard_size=size)
        (target / "tokenizer.json").write_text("{}")
        shards = shard_names(target)
        if fmt == "official":
            weights = ["pytorch_model.bin"]
        elif size is None:
            weights = ["model.safetensors"]
        else:
            assert len(shards) >= 2
            weights = [INDEX, *shards]
        assert sorted(os.listdir(target)) == sorted(["config.json", "tokenizer.json", *weights]), (fmt, size)
        assert os.listdir(tmp_path) == ["ckpt"]
        ids = random_ids()
        assert torch.equal(logits_of(MambaLM.from_pretrained(target), ids), logits_of(model, ids)), (fmt, size)


def test_a_shard_no_index_names_is_removed_by_the_next_save(tmp_path):
    """A file named like a shard (left by a killed save of another tool, or by hand) is no
    weight of the new checkpoint; another file of the directory is kept."""
    small_model(seed=1).save_pretrained(tmp_path, max_shard_size="15KB")
    (tmp_path / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    (tmp_path / ".model-00002-of-00009.safetensors.abcd1234.tmp").write_bytes(b"partial")
    (tmp_path / "model-notes.txt").write_text("mine")
    small_model(seed=2).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model-notes.txt", "model.safetensors"]


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-checkpoint", "into-a-new-directory"])
def test_a_save_failing_at_a_shard_leaves_the_old_checkpoint_or_nothing(tmp_path, monkeypatch, existing):
    import safetensors.torch
    target = tmp_path / "ckpt"
    if existing:
        small_model(seed=1).save_pretrained(target, max_shard_size="40KB")
        before = snapshot(target)
    real_save_file, calls = safetensors.torch.save_file, []

    def failing_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save_file(*args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_at_the_second)
    with pytest.raises(OSError, match="No space"):
        small_model(seed=2).save_pretrained(target, format="hf", max_shard_size="15KB")
    assert os.listdir(tmp_path) == ["ckpt"]
    if existing:
        assert snapshot(target) == before
    else:
        assert os.listdir(target) == []  # no shard of the failed save left behind


@pytest.mark.parametrize("first,second", [(("hf", "15KB"), ("mambakit", None)), (("mambakit", None), ("hf", "15KB")),
                                          (("hf", "40KB"), ("hf", "15KB"))], ids=["shards-then-one", "one-then-shards",
                                                                                  "shards-then-more-shards"])
def test_a_sharded_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, first, second):
    parent, states = tmp_path / "parent", tmp_path / "states"
    parent.mkdir(), states.mkdir()
    target = parent / "ckpt"
    old, new = small_model(seed=1, tie_embeddings=False), small_model(seed=2, tie_embeddings=False)
    old.save_pretrained(target, format=first[0], max_shard_size=first[1])
    with monkeypatch.context() as patch:
        recorder = Recorder(patch, parent, states)
        new.save_pretrained(target, format=second[0], max_shard_size=second[1])
    recorder.snapshot()
    assert len(recorder.states) >= 3
    for state in recorder.states:
        loaded = load(state / "ckpt")
        assert same_weights(loaded, old) or same_weights(loaded, new), state.name
    assert same_weights(load(target), new)


# ---- from_pretrained -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_from_pretrained_returns_the_model_in_eval_mode(tmp_path, fmt):
    small_model().train().save_pretrained(tmp_path, format=fmt)
    loaded = MambaLM.from_pretrained(tmp_path)
    assert not any(module.training for module in loaded.modules())


@pytest.mark.parametrize("name", ["./my_run", "../no-such-dir/run", "runs/a/run", "my_run/", "~/no-such-mambakit-run",
                                  "/no-such-mambakit-dir/run", Path("org/name")])
def test_a_missing_path_is_reported_as_a_path_that_does_not_exist(hub_cache, name):
    with pytest.raises(FileNotFoundError) as excinfo:
        MambaLM.from_pretrained(name)
    message = str(excinfo.value)
    assert repr(str(name)) in message and "does not exist" in message
    assert os.path.abspath(os.path.expanduser(name)) in message  # where it looked
    assert "hf download" not in message and "Hugging Face cache" not in message


@pytest.mark.parametrize("name", ["org/no-such-model", "no-such-model"])
def test_a_hub_id_not_in_the_cache_says_how_to_fetch_it(hub_cache, name):
    with pytest.raises(FileNotFoundError) as excinfo:
        MambaLM.from_pretrained(name)
    message = str(excinfo.value)
    assert f"`hf download {name}`" in message and str(hub_cache) in message
    assert os.path.abspath(name) in message  # it may have been meant as a local directory too


def test_the_cli_says_a_missing_model_path_does_not_exist(hub_cache, capsys):
    from mambakit.cli import main
    with pytest.raises(SystemExit) as excinfo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["generate", "--model", "./my_run", "--prompt", "hi", "--max-new-tokens", "1"])
    code = excinfo.value.code  # SystemExit("error: ...") prints its message on stderr and exits with 1
    assert code not in (0, None)
    lines = (code if isinstance(code, str) else capsys.readouterr().err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "./my_run" in lines[0] and "does not exist" in lines[0] and "hf download" not in lines[0]
