"""config.json fuzzed with hypothesis, in the three formats' layouts: fields replaced, deleted or
added with values of every JSON kind (huge, negative and zero ints, nan and inf, strings,
bools, null, lists, objects), next to valid weights. Loading either succeeds with a model that
holds exactly those weights, or raises a ValueError naming config.json: never another
exception, never an allocation of the size a wrong field asks for (the process's data memory
is capped while loading)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mambakit import MambaLM
from tests.checkpoint.test_checkpoint import small_model
from tests.checkpoint.test_reliability import allocation_limit

FORMATS = ("mambakit", "hf", "official")
MODEL = small_model(seed=5, tie_embeddings=False)
EXTRA_KEYS = ["hidden_size", "d_model", "model_type", "format", "ssm_cfg", "weight_map", "unknown_field",
              "pad_vocab_size_multiple", "d_intermediate", "attn_layer_idx", "intermediate_size", "time_step_rank"]

json_scalars = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 7, 8, 16, 2**31, 2**40, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 32.0]),
    st.text(max_size=8), st.sampled_from(["auto", "false", "true", "mamba", "Mamba1", "silu", "mambakit"]),
    st.booleans(), st.none(),
)
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                        st.dictionaries(st.text(max_size=6), json_scalars, max_size=3))


@st.composite
def edits(draw, base: dict) -> list[tuple]:
    """1 to 3 edits of a config: ("set", path, value), ("delete", path) or ("whole", value),
    where path is a key or ("ssm_cfg", key)."""
    keys = sorted(base) + EXTRA_KEYS
    nested = [("ssm_cfg", k) for k in sorted(base.get("ssm_cfg") or {})] + [("ssm_cfg", "layer"), ("ssm_cfg", "bias")]
    paths = st.sampled_from(keys + nested)
    one = st.one_of(st.tuples(st.just("set"), paths, json_values), st.tuples(st.just("delete"), paths))
    result = draw(st.lists(one, min_size=1, max_size=3))
    if draw(st.integers(0, 30)) == 0:
        result.append(("whole", draw(json_values)))
    return result


def apply(base: dict, changes: list[tuple]):
    raw = json.loads(json.dumps(base))
    for change in changes:
        if change[0] == "whole":
            return change[1]
        path = change[1] if isinstance(change[1], tuple) else (change[1],)
        holder = raw
        if len(path) == 2:
            if not isinstance(raw.get(path[0]), dict):
                continue
            holder = raw[path[0]]
        if change[0] == "set":
            holder[path[-1]] = change[2]
        else:
            holder.pop(path[-1], None)
    return raw


@pytest.fixture(scope="module")
def checkpoints():
    root = Path(tempfile.mkdtemp(prefix="mambakit-fuzz-"))
    dirs = {}
    for fmt in FORMATS:
        MODEL.save_pretrained(root / fmt, format=fmt)
        dirs[fmt] = root / fmt
    yield dirs
    shutil.rmtree(root, ignore_errors=True)


def _encodable(raw) -> bool:
    try:
        json.dumps(raw, allow_nan=True)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_config_json_loads_consistently_or_is_a_value_error(checkpoints, fmt):
    directory = checkpoints[fmt]
    base = json.loads((directory / "config.json").read_text())
    expected = MODEL.state_dict()
    limit = allocation_limit()  # one cap for every example

    @settings(max_examples=70, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(edits(base))
    def run(changes):
        raw = apply(base, changes)
        if not _encodable(raw):  # e.g. a float too large for JSON's text: not a file anyone can write
            return
        (directory / "config.json").write_text(json.dumps(raw, allow_nan=True))
        try:
            with limit:
                model = MambaLM.from_pretrained(directory)
        except ValueError as err:
            assert str(directory / "config.json") in str(err), err
            event("refused")
            return
        event("loaded")
        state = model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert model.config.n_layer == MODEL.config.n_layer and model.config.d_model == MODEL.config.d_model
        assert all(math.isfinite(getattr(model.config, f)) for f in ("dt_min", "dt_max", "norm_epsilon"))

    try:
        run()
    finally:
        (directory / "config.json").write_text(json.dumps(base))
