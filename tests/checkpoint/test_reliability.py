"""Checkpoints that are wrong, hostile or half-written: names read from files that point outside
the checkpoint, corrupt and truncated files, config values of the wrong type or size, and saves
killed at every step (each step's state on disk is copied and must load as the old or the new
checkpoint). Every failure is a ValueError naming the file, found before any allocation."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mambakit import MambaLM
from mambakit.checkpoint import read_config, resolve_directory
from tests.checkpoint import test_checkpoint
from tests.checkpoint.test_checkpoint import D_STATE, logits_of, random_ids, shard_by_hand, small_model

hub_cache = test_checkpoint.hub_cache  # the fixture: a local Hugging Face cache

WEIGHTS = {"mambakit": "model.safetensors", "hf": "model.safetensors", "official": "pytorch_model.bin"}


class allocation_limit:
    """Caps the process's data memory (Linux) at its size when this object is made plus
    `extra`, while inside `with`, so that an allocation of the size a corrupt config asks for
    fails at once instead of swapping. The cap is fixed when made: entered once per example,
    what earlier examples kept cannot raise it."""

    def __init__(self, extra: int = 1 << 30):
        try:
            used = int(re.search(r"VmData:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            used = None
        self.cap = None if used is None else used + extra

    def __enter__(self):
        self.saved = resource.getrlimit(resource.RLIMIT_DATA)
        if self.cap is not None:
            hard = self.saved[1]
            resource.setrlimit(resource.RLIMIT_DATA, (self.cap if hard == resource.RLIM_INFINITY else min(hard, self.cap),
                                                      hard))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_DATA, self.saved)
        return False


def load(directory) -> MambaLM:
    with allocation_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice that an interrupted save's old checkpoint is read
        return MambaLM.from_pretrained(directory)


def edit_config(directory: Path, **changes) -> None:
    raw = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            raw.pop(key)
        else:
            raw[key] = value
    (directory / "config.json").write_text(json.dumps(raw))


DELETE = object()


def same_weights(model: MambaLM, reference: MambaLM) -> bool:
    got, want = model.state_dict(), reference.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---- names read from files must stay inside the checkpoint -----------------------------------

def _sharded(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A checkpoint whose weights are two shards named by an index; returns (directory, index)."""
    directory = tmp_path / "ckpt"
    model = small_model(tie_embeddings=False)
    if kind == "safetensors":
        model.save_pretrained(directory, format="hf")
        shard_by_hand(directory)
        return directory, directory / "model.safetensors.index.json"
    model.save_pretrained(directory, format="official")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    (directory / "pytorch_model.bin").unlink()
    weight_map = {}
    for i, name in enumerate(["pytorch_model-1.bin", "pytorch_model-2.bin"]):
        torch.save({k: v for j, (k, v) in enumerate(sorted(state.items())) if j % 2 == i}, directory / name)
        weight_map.update({k: name for j, k in enumerate(sorted(state)) if j % 2 == i})
    index = directory / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return directory, index


def _point_shard_at(index: Path, name: str) -> None:
    """Makes the index's first shard entry name `name` (the shard's keys stay the same)."""
    raw = json.loads(index.read_text())
    first = sorted(set(raw["weight_map"].values()))[0]
    raw["weight_map"] = {k: (name if v == first else v) for k, v in raw["weight_map"].items()}
    index.write_text(json.dumps(raw))


ESCAPES = {
    "parent": lambda d, shard: os.path.relpath(shard, d),  # ../outside-shard
    "absolute": lambda d, shard: str(shard),
    "dotdot_inside": lambda d, shard: "sub/../" + os.path.relpath(shard, d),
    "symlink_out": "link",  # a plain name, but a link that resolves outside
}


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("escape", list(ESCAPES))
def test_an_index_naming_a_shard_outside_the_directory_is_refused(tmp_path, kind, escape):
    directory, index = _sharded(tmp_path, kind)
    first = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    outside = tmp_path / ("outside-" + first)
    shutil.move(directory / first, outside)  # a valid shard: the only thing wrong is where it is
    (directory / "sub").mkdir()
    if escape == "symlink_out":
        os.symlink(outside, directory / "link")
        name = "link"
    else:
        name = ESCAPES[escape](directory, outside)
    _point_shard_at(index, name)
    with pytest.raises(ValueError, match=re.escape(str(index))):
        load(directory)


def test_shards_in_the_hub_cache_are_links_into_its_blobs_and_load(tmp_path, hub_cache):
    """The Hugging Face cache's snapshot files are symbolic links into the repository's blobs/:
    they resolve outside the snapshot directory but inside the repository, and load."""
    staged, _ = _sharded(tmp_path, "safetensors")
    commit = hashlib.sha1(b"sharded snapshot").hexdigest()
    repo = hub_cache / "models--org--sharded"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in os.listdir(staged):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        shutil.copy(staged / name, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    os.symlink(snapshot, tmp_path / "alias")  # a link to the snapshot: the same rule
    ids = random_ids()
    expected = logits_of(load(staged).eval(), ids)
    assert torch.equal(logits_of(load("org/sharded").eval(), ids), expected)
    assert torch.equal(logits_of(load(tmp_path / "alias").eval(), ids), expected)


@pytest.mark.parametrize("pointer", ["parent", "absolute"])
def test_a_run_latest_pointer_outside_the_run_is_refused(tmp_path, pointer):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    small_model().save_pretrained(elsewhere)
    run.mkdir()
    (run / "latest").write_text("../elsewhere\n" if pointer == "parent" else f"{elsewhere}\n")
    with pytest.raises(ValueError, match=re.escape(str(run / "latest"))):
        load(run)


@pytest.mark.parametrize("ref", ["relative", "absolute"])
def test_hub_refs_naming_a_directory_outside_the_snapshots_are_refused(tmp_path, hub_cache, ref):
    elsewhere = tmp_path / "elsewhere"
    small_model().save_pretrained(elsewhere)
    repo = hub_cache / "models--org--evil"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(os.path.relpath(elsewhere, repo / "snapshots") if ref == "relative"
                                        else str(elsewhere))
    with pytest.raises(ValueError, match="refs"):
        load("org/evil")


# ---- corrupt files: a ValueError naming the file ---------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "safetensors_truncated": ("mambakit", "model.safetensors", _truncate),
    "safetensors_empty": ("mambakit", "model.safetensors", lambda p: p.write_bytes(b"")),
    "safetensors_random": ("hf", "model.safetensors", lambda p: p.write_bytes(os.urandom(4096))),
    "bin_truncated": ("official", "pytorch_model.bin", _truncate),
    "bin_empty": ("official", "pytorch_model.bin", lambda p: p.write_bytes(b"")),
    "bin_random": ("official", "pytorch_model.bin", lambda p: p.write_bytes(os.urandom(4096))),
    "bin_not_a_state_dict": ("official", "pytorch_model.bin", lambda p: torch.save([torch.zeros(2)], p)),
    "config_list": ("mambakit", "config.json", lambda p: p.write_text("[1, 2]")),
    "config_string": ("hf", "config.json", lambda p: p.write_text('"mamba"')),
    "config_invalid_json": ("official", "config.json", lambda p: p.write_text('{"d_model": 32,')),
    "config_not_utf8": ("mambakit", "config.json", lambda p: p.write_bytes(b'{"d_model": "\xff\xfe"}')),
    "official_ssm_cfg_list": ("official", "config.json", lambda p: p.write_text(json.dumps(
        json.loads(p.read_text()) | {"ssm_cfg": [["d_state", 8]]}))),
}


@pytest.mark.parametrize("fmt,name,corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_a_corrupt_file_is_a_value_error_naming_it(tmp_path, fmt, name, corrupt):
    small_model().save_pretrained(tmp_path, format=fmt)
    corrupt(tmp_path / name)
    with pytest.raises(ValueError) as excinfo:
        load(tmp_path)
    assert str(tmp_path / name) in str(excinfo.value)


@pytest.mark.parametrize("fmt,field", [("hf", "hidden_size"), ("hf", "num_hidden_layers"), ("official", "n_layer")])
def test_a_missing_config_field_is_named(tmp_path, fmt, field):
    small_model().save_pretrained(tmp_path, format=fmt)
    edit_config(tmp_path, **{field: DELETE})
    with pytest.raises(ValueError, match=f"config.json.*missing the field '{field}'"):
        load(tmp_path)


INDEX_DAMAGE = {
    "no_weight_map": lambda raw: {"metadata": raw["metadata"]},
    "weight_map_list": lambda raw: raw | {"weight_map": list(raw["weight_map"].items())},
    "weight_map_values_not_names": lambda raw: raw | {"weight_map": {k: [v] for k, v in raw["weight_map"].items()}},
    "missing_shard": lambda raw: raw | {"weight_map": {k: "model-gone.safetensors" for k in raw["weight_map"]}},
}


@pytest.mark.parametrize("damage", list(INDEX_DAMAGE.values()), ids=list(INDEX_DAMAGE))
def test_a_broken_index_is_a_value_error_naming_it(tmp_path, damage):
    directory, index = _sharded(tmp_path, "safetensors")
    index.write_text(json.dumps(damage(json.loads(index.read_text()))))
    with pytest.raises(ValueError, match=re.escape(str(index))):
        load(directory)


# ---- config values: types and sizes ----------------------------------------------------------

TYPE_ERRORS = {  # values that a truth test or a loose int check would have taken
    "mambakit_residual_in_fp32_string": ("mambakit", "residual_in_fp32", "false"),
    "mambakit_tie_embeddings_string": ("mambakit", "tie_embeddings", "no"),
    "mambakit_bias_int": ("mambakit", "bias", 0),
    "hf_tie_word_embeddings_string": ("hf", "tie_word_embeddings", "no"),
    "hf_residual_in_fp32_string": ("hf", "residual_in_fp32", "false"),
    "hf_use_conv_bias_int": ("hf", "use_conv_bias", 1),
    "official_residual_in_fp32_string": ("official", "residual_in_fp32", "false"),
    "official_rms_norm_int": ("official", "rms_norm", 1),
    "official_tie_embeddings_null": ("official", "tie_embeddings", None),
}


@pytest.mark.parametrize("fmt,field,value", list(TYPE_ERRORS.values()), ids=list(TYPE_ERRORS))
def test_a_config_flag_that_is_not_a_json_bool_is_refused(tmp_path, fmt, field, value):
    small_model().save_pretrained(tmp_path, format=fmt)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"config.json.*{field}.*{re.escape(repr(value))}"):
        load(tmp_path)


@pytest.mark.parametrize("fmt,field", [("mambakit", "vocab_size"), ("official", "vocab_size"), ("hf", "vocab_size"),
                                       ("mambakit", "d_model"), ("hf", "hidden_size")])
def test_a_huge_size_in_the_config_is_refused_before_any_allocation(tmp_path, fmt, field):
    small_model().save_pretrained(tmp_path, format=fmt)
    edit_config(tmp_path, **{field: 2**40})
    with pytest.raises(ValueError, match=f"config.json.*{field}"):
        load(tmp_path)


@pytest.mark.parametrize("fmt,field,value", [("mambakit", "vocab_size", 2**30), ("hf", "vocab_size", 2**30),
                                             ("official", "d_model", 2**17), ("hf", "state_size", 2 * D_STATE),
                                             ("official", "n_layer", 5000)])
def test_config_sizes_that_disagree_with_the_weights_are_named_before_allocating(tmp_path, fmt, field, value):
    """Sizes within MambaConfig's bounds but not those of the weights: the model they describe
    (hundreds of GiB for some) is never allocated; the message names config.json, the field
    and the tensor."""
    small_model().save_pretrained(tmp_path, format=fmt)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError) as excinfo:
        load(tmp_path)  # under allocation_limit: allocating the model would fail with a RuntimeError
    message = str(excinfo.value)
    assert str(tmp_path / "config.json") in message and field in message, message


# ---- saves killed at every step --------------------------------------------------------------

class Recorder:
    """Copies the directory around a checkpoint before every rename, replace, unlink and
    rmdir that a save makes: the states a kill can leave behind."""

    OPS = ("rename", "replace", "unlink", "rmdir")

    def __init__(self, monkeypatch, parent: Path, into: Path):
        self.parent, self.into, self.states = parent, into, []
        for name in self.OPS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def op(*args, **kwargs):
            self.snapshot()
            return real(*args, **kwargs)
        return op

    def snapshot(self) -> None:
        copy = self.into / f"state-{len(self.states):03d}"
        shutil.copytree(self.parent, copy, symlinks=True)
        self.states.append(copy)


def _save_first(fmt: str, model: MambaLM, directory: Path) -> None:
    if fmt == "hf_sharded":
        model.save_pretrained(directory, format="hf")
        shard_by_hand(directory)
    else:
        model.save_pretrained(directory, format=fmt)


SWITCHES = [("mambakit", "hf"), ("hf", "official"), ("official", "mambakit"), ("mambakit", "official"),
            ("hf_sharded", "mambakit"), ("mambakit", "mambakit")]


@pytest.mark.parametrize("first,second", SWITCHES, ids=[f"{a}-then-{b}" for a, b in SWITCHES])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, first, second):
    parent, states = tmp_path / "parent", tmp_path / "states"
    parent.mkdir(), states.mkdir()
    target = parent / "ckpt"
    old, new = small_model(seed=1, tie_embeddings=False), small_model(seed=2, tie_embeddings=False)
    _save_first(first, old, target)
    (target / "tokenizer.json").write_text("{}")  # another file of the directory, kept throughout
    with monkeypatch.context() as patch:
        recorder = Recorder(patch, parent, states)
        new.save_pretrained(target, format=second)
    recorder.snapshot()  # and the state after the save
    assert len(recorder.states) >= 3
    for state in recorder.states:
        copy = state / "ckpt"
        loaded = load(copy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the notice that an interrupted save's old checkpoint is read
            _, fmt = read_config(resolve_directory(copy))
        is_old, is_new = same_weights(loaded, old), same_weights(loaded, new)
        assert is_old or is_new, state.name
        assert fmt == (second if is_new else first.replace("_sharded", "")), state.name  # as its config says
    for state in recorder.states:  # the next save recovers from whatever the kill left, and leaves nothing behind
        copy = state / "ckpt"
        small_model(seed=3, tie_embeddings=False).save_pretrained(copy, format="official")
        assert os.listdir(state) == ["ckpt"], state.name
        assert sorted(os.listdir(copy)) == ["config.json", "pytorch_model.bin", "tokenizer.json"], state.name
    final = parent / "ckpt"
    weights = WEIGHTS[second]
    assert sorted(os.listdir(parent)) == ["ckpt"]
    assert sorted(os.listdir(final)) == sorted(["config.json", weights, "tokenizer.json"])


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "ckpt"
    small_model(seed=1).save_pretrained(target)
    leftovers = [tmp_path / ".ckpt.tmp-abcd1234", tmp_path / ".ckpt.old-wxyz_789"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    inside = [target / ".model.safetensors.k3j4h5g6.tmp", target / ".config.json.a1b2c3d4.tmp"]
    for f in inside:
        f.write_bytes(b"partial")
    mine = [tmp_path / ".ckpt.backup", tmp_path / ".other.tmp-abcd1234", target / "notes.tmp"]
    for f in mine:
        f.write_text("not a leftover")
    small_model(seed=2).save_pretrained(target, format="hf")
    assert not any(os.path.lexists(p) for p in leftovers + inside)
    assert all(p.read_text() == "not a leftover" for p in mine)


def test_a_save_killed_between_its_renames_is_read_from_the_old_copy_and_put_back(tmp_path):
    target = tmp_path / "ckpt"
    old = small_model(seed=1)
    old.save_pretrained(target)
    os.rename(target, tmp_path / ".ckpt.old-abcd1234")  # the state between the two renames
    (tmp_path / ".ckpt.tmp-abcd1234").mkdir()
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = MambaLM.from_pretrained(target)
    assert same_weights(loaded, old)
    new = small_model(seed=2)
    new.save_pretrained(target, format="official")
    assert os.listdir(tmp_path) == ["ckpt"]
    assert same_weights(load(target), new)


def test_a_directory_that_cannot_be_renamed_is_switched_in_place(tmp_path, monkeypatch):
    """A mount point or a busy directory: the files are switched, config.json removed first
    and written last, so that each state loads as the old or the new, or fails loudly."""
    parent, states = tmp_path / "parent", tmp_path / "states"
    parent.mkdir(), states.mkdir()
    target = parent / "ckpt"
    old, new = small_model(seed=1), small_model(seed=2)
    old.save_pretrained(target, format="mambakit")
    real_rename = os.rename

    def busy(src, dst, *args, **kwargs):
        if os.path.realpath(src) == os.path.realpath(target):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real_rename(src, dst, *args, **kwargs)
    with monkeypatch.context() as patch:
        recorder = Recorder(patch, parent, states)
        patch.setattr(os, "rename", busy)
        new.save_pretrained(target, format="official")
    for state in recorder.states:
        copy = state / "ckpt"
        if not (copy / "config.json").exists():
            with pytest.raises(FileNotFoundError, match="config.json"):
                load(copy)
            continue
        loaded = load(copy)
        _, fmt = read_config(copy)
        assert (same_weights(loaded, old) and fmt == "mambakit") or (same_weights(loaded, new) and fmt == "official"), \
            state.name
    assert sorted(os.listdir(parent)) == ["ckpt"]
    assert sorted(os.listdir(target)) == ["config.json", "pytorch_model.bin"]
    assert same_weights(load(target), new)


def test_saving_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    small_model(seed=1).save_pretrained(target)
    monkeypatch.chdir(target)
    new = small_model(seed=2)
    new.save_pretrained(".", format="hf")
    assert os.path.samefile(os.getcwd(), target)  # the process's directory is still the checkpoint
    assert sorted(os.listdir(".")) == ["config.json", "model.safetensors"]
    assert same_weights(load(target), new)


def test_a_save_keeps_the_directory_other_files_its_mode_and_a_link_to_it(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    small_model(seed=1).save_pretrained(real, format="official")
    os.chmod(real, 0o750)
    (real / "tokenizer.json").write_text('{"v": 1}')
    (real / "extra").mkdir()
    (real / "extra" / "notes.txt").write_text("kept")
    os.symlink("tokenizer.json", real / "alias.json")
    os.symlink(real, link)
    new = small_model(seed=2)
    new.save_pretrained(link, format="mambakit")
    assert link.is_symlink() and os.path.samefile(link, real)
    assert real.stat().st_mode & 0o777 == 0o750
    assert (real / "tokenizer.json").read_text() == '{"v": 1}' and (real / "extra" / "notes.txt").read_text() == "kept"
    assert os.readlink(real / "alias.json") == "tokenizer.json"
    assert sorted(os.listdir(real)) == ["alias.json", "config.json", "extra", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert same_weights(load(link), new)


def test_a_failed_save_into_a_new_directory_leaves_no_checkpoint_and_no_leftovers(tmp_path, monkeypatch):
    import safetensors.torch

    def failing(*args, **kwargs):
        raise OSError("simulated: disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="simulated"):
        small_model().save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "new") == []
    small_model().save_pretrained(tmp_path / "new")
    assert sorted(os.listdir(tmp_path / "new")) == ["config.json", "model.safetensors"]
    assert load(tmp_path / "new") is not None


def test_a_checkpoint_without_config_is_refused_not_guessed(tmp_path):
    """What a kill during an in-place switch leaves: weights and no config.json."""
    small_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)
    assert load_file(str(tmp_path / "model.safetensors"))  # the weights are still there


def test_saving_over_an_index_that_names_files_outside_removes_nothing_outside(tmp_path):
    """The old checkpoint's shards (named by its index) are not carried into the new one, but
    a name that points outside the directory is not the checkpoint's and is never removed."""
    directory, index = _sharded(tmp_path, "safetensors")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    raw = json.loads(index.read_text())
    raw["weight_map"]["extra.key"] = "../victim.txt"
    index.write_text(json.dumps(raw))
    shards = set(raw["weight_map"].values()) - {"../victim.txt"}
    new = small_model(seed=4)
    new.save_pretrained(directory, format="hf")
    assert victim.read_text() == "precious"
    assert not shards & set(os.listdir(directory))
    assert same_weights(load(directory), new)
