"""The hybrid evidence (issue: hybrids, "Evidence"): the paper-task runner's hybrid row trains and
evaluates, a hybrid's long-length evaluation records what does not fit instead of crashing, and
the decoding benchmark states each model's cache size as the config implies (KV caches and SSM
states computed independently here) and writes its JSON and plot."""

import json
import time
from argparse import Namespace

import pytest
import torch

from mambakit import MambaLM
from mambakit.config import MambaConfig
from mambakit.tasks import induction_heads as ih
from mambakit.tasks.synthetic import ModelArgs, build_model, hybrid_attn_cfg
from tests.benchmark_scripts import load_benchmark


def small_hybrid(d_model: int = 64):
    """The paper-task hybrid's shape (2 layers, layer 1 attention), random weights."""
    return build_model(ModelArgs(d_model=d_model, attn_layer_idx=[1], attn_cfg=hybrid_attn_cfg(d_model)), 16,
                       torch.device("cpu"), seed=0)


# ---- the paper-task runner's hybrid row ----------------------------------------------------------

def test_paper_tasks_hybrid_row_trains_and_evaluates(tmp_path):
    """`paper_tasks.py --smoke --layer hybrid`: both tasks train the hybrid (attention at layer 1
    of the same 2 x 64 model) and evaluate it; the induction lengths beyond the memory budget
    are recorded as "not run: memory" (accuracy null), the ones within it run."""
    pt = load_benchmark("paper_tasks")
    batch = pt.SMOKE["induction"]["eval_batch"]
    model = small_hybrid()
    fits, too_big = (ih.evaluation_memory(model, n, batch, ih.MIN_ATTENTION_CHUNK, "cpu") for n in (64, 128))
    budget_gib = (fits + too_big) / 2 / 2**30  # 64 fits in the shortest chunks, 128 does not
    out = tmp_path / "hybrid.json"
    assert pt.main(["--smoke", "--layer", "hybrid", "--out", str(out), "--set", "copy.steps=2",
                    "--set", "induction.steps=2", "--set", "induction.lengths=16..128",
                    "--set", f"induction.hybrid_memory_gib={budget_gib!r}"]) == 0
    result = json.loads(out.read_text())
    (copy,), (induction,) = result["selective_copying"], result["induction_heads"]
    for row in (copy, induction):
        assert row["name"] == pt.HYBRID and row["steps_run"] == 2 and 0 <= row["accuracy"] <= 1
        assert row["model"]["attn_layer_idx"] == [1] and row["model"]["attn_cfg"] == hybrid_attn_cfg(64)
        assert row["n_params"] == sum(p.numel() for p in model.parameters())
    assert copy["seq_len"] == pt.SMOKE["copy"]["seq_len"]  # selective copying: at the training length
    lengths = {r["length"]: r for r in induction["lengths"]}
    assert sorted(lengths) == [16, 32, 64, 128]
    for n in (16, 32, 64):
        assert 0 <= lengths[n]["accuracy"] <= 1 and lengths[n]["chunk_len"] <= n
    assert lengths[128]["accuracy"] is None and lengths[128]["status"] == "not run: memory"
    assert lengths[128]["estimated_gib"] > lengths[128]["budget_gib"]
    assert out.with_suffix(".png").is_file()


def test_hybrid_evaluation_records_oom_and_time_instead_of_crashing(monkeypatch):
    """A length that runs out of memory all the same is "not run: oom" and the longer ones are
    not tried; with a time budget, a length whose extrapolated (quadratic) time would overrun it
    is "not run: time". The pure model's rows keep their form."""
    model = small_hybrid(d_model=16)
    tried = []

    def out_of_memory_from_64(model, length, *args, **kwargs):
        tried.append(length)
        if length >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return 0.5

    monkeypatch.setattr(ih, "evaluate_length", out_of_memory_from_64)
    rows = ih.evaluate_lengths(model, [32, 64, 128], 2, 1, 0, "cpu", memory_budget=2**30, log=None)
    assert tried == [32, 64]
    assert rows[0]["accuracy"] == 0.5
    assert [(r["accuracy"], r["status"]) for r in rows[1:]] == [(None, "not run: oom"), (None, "not run: memory")]

    def quadratic_time(model, length, *args, **kwargs):
        time.sleep(1e-6 * length**2)  # 32: 1 ms, 64: 4 ms, 1024: ~1 s
        return 0.25

    monkeypatch.setattr(ih, "evaluate_length", quadratic_time)
    rows = ih.evaluate_lengths(model, [32, 64, 1024], 2, 1, 0, "cpu", memory_budget=2**30, time_budget=0.5, log=None)
    assert [r["accuracy"] for r in rows] == [0.25, 0.25, None]
    assert rows[2]["status"] == "not run: time" and rows[2]["predicted_seconds"] >= 1.0
    pure = build_model(ModelArgs(d_model=16), 16, torch.device("cpu"), seed=0)
    assert set(ih.evaluate_lengths(pure, [32], 2, 1, 0, "cpu", log=None)[0]) == {"length", "accuracy", "seconds"}


# ---- the decoding benchmark ----------------------------------------------------------------------

def expected_cache_bytes(config: MambaConfig, batch: int, slots: int, dtype_bytes: int = 4) -> dict:
    """The cache's size from the config alone: per attention layer keys and values
    (2 · B · Hkv · head_dim · slots), the int64 lengths (B) and, with a qkv conv, its state
    (B, head_dim · (H + 2 · Hkv), d_conv - 1); per Mamba-2 layer the conv state
    (B, d_inner + 2 · ngroups · d_state, d_conv - 1) and the fp32 SSM state (B, heads, headdim, d_state)."""
    n_attn = len(config.attn_layer_idx)
    kv = 0
    if n_attn:
        attn = config.attention
        qkv_conv = batch * attn.head_dim * (attn.num_heads + 2 * attn.num_heads_kv) * max(attn.d_conv - 1, 0)
        kv = n_attn * (2 * batch * attn.num_heads_kv * attn.head_dim * slots * dtype_bytes + batch * 8
                       + qkv_conv * dtype_bytes)
    conv_dim = config.d_inner + 2 * config.ngroups * config.d_state
    heads = config.d_inner // config.headdim
    ssm = (config.n_layer - n_attn) * (batch * conv_dim * (config.d_conv - 1) * dtype_bytes
                                       + batch * heads * config.headdim * config.d_state * 4)
    return {"kv_bytes": kv, "ssm_bytes": ssm, "cache_bytes": kv + ssm}


@pytest.fixture(scope="module")
def decode_bench():
    return load_benchmark("hybrid_decode")


@pytest.fixture(scope="module")
def decode_configs(decode_bench):
    """The three models at a small width: 4 Mamba-2 layers, 1 of them attention in the hybrid
    (grouped heads: 4 query, 2 key/value heads of 32), a 2-layer Transformer with an MLP."""
    base = MambaConfig.from_name("mamba2-tiny", d_model=128, n_layer=4, vocab_size=64)
    return decode_bench.model_configs(base, attn_layers=1, head_dim=32, kv_heads=2, transformer_layers=2,
                                      d_intermediate=256)


def test_decode_configs_are_the_three_models(decode_bench, decode_configs):
    mamba2, hybrid, transformer = (decode_configs[k] for k in ("mamba2", "hybrid", "transformer"))
    assert {c.d_model for c in decode_configs.values()} == {128}
    assert mamba2.layer_pattern == "mmmm" and hybrid.layer_pattern == "mmam" and transformer.layer_pattern == "aa"
    assert hybrid.d_intermediate == 0 and transformer.d_intermediate == 256
    assert hybrid.attention.num_heads == 4 and hybrid.attention.num_heads_kv == 2
    assert hybrid.attention.d_conv == 4 and transformer.attention.d_conv == 0  # (mamba2attn's qkv conv)
    assert decode_bench.attention_layers(24, 3) == [6, 12, 18]


@pytest.mark.parametrize("name", ["mamba2", "hybrid", "transformer"])
def test_decode_cache_bytes_equal_the_configs_sizes(decode_bench, decode_configs, name):
    """The cache size the benchmark states (from the cache objects after a chunked prefill) is
    the KV caches' and SSM states' size computed from the config."""
    config = decode_configs[name]
    model = MambaLM(config).eval()
    batch, context, slots = 2, 40, 50
    cache = decode_bench.prefilled_cache(model, context, batch, chunk=16, slots=slots, device="cpu")
    assert cache.seqlen == context
    assert decode_bench.cache_bytes(cache) == expected_cache_bytes(config, batch, slots)


def test_decode_row_times_and_states_the_hybrids_cache(decode_bench, decode_configs):
    """measure_context on the hybrid: its row's cache bytes are the config's at the KV slots it
    allocated (the context and every token decoded), and decoding took time."""
    config = decode_configs["hybrid"]
    model = MambaLM(config).eval()
    args = Namespace(steps=2, repeats=1, batch=1, prefill_chunk=16, seed=0)
    row = decode_bench.measure_context(model, 24, args, "cpu")
    assert row["kv_slots"] == 24 + decode_bench.decode_tokens(2, 1)
    assert {k: row[k] for k in ("kv_bytes", "ssm_bytes", "cache_bytes")} == expected_cache_bytes(
        config, 1, row["kv_slots"])
    assert row["ms_per_token"] >= 0 and row["max_memory_allocated"] is None  # (CPU: no CUDA peak)


def test_decode_benchmark_writes_json_and_png_and_records_oom(decode_bench, tmp_path, monkeypatch):
    """The command end to end on CPU at tiny sizes; a context that runs out of memory is
    recorded as "oom" and the next one still runs; --plot redraws the PNG."""
    real = decode_bench.prefilled_cache

    def out_of_memory_at_48(model, context, *args, **kwargs):
        if context == 48:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(model, context, *args, **kwargs)

    monkeypatch.setattr(decode_bench, "prefilled_cache", out_of_memory_at_48)
    out = tmp_path / "decode.json"
    assert decode_bench.main(["--smoke", "--d-model", "64", "--n-layer", "2", "--contexts", "16,48,64",
                              "--steps", "2", "--repeats", "1", "--models", "hybrid,transformer",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["hybrid", "transformer"]
    for entry in result["models"].values():
        rows = {r["context"]: r for r in entry["rows"]}
        assert rows[48]["status"] == "oom" and "ms_per_token" not in rows[48]
        assert rows[16]["cache_bytes"] < rows[64]["cache_bytes"]  # the KV cache grows with the context
    png = out.with_suffix(".png")
    png.unlink()
    assert decode_bench.main(["--plot", str(out)]) == 0 and png.is_file()
    with pytest.raises(SystemExit, match="--models"):
        decode_bench.main(["--smoke", "--models", "mamba2,gpt"])
