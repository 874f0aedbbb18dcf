"""`mambakit train` on CPU: it runs on the embedded corpus and `generate` loads its checkpoint,
an interrupted and resumed run gives the same losses as an uninterrupted one, the data split
and batches are deterministic, and bad arguments fail clearly without touching a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mambakit.cli import main
from mambakit.models.lm import MambaLM
from mambakit.training import TrainConfig, lr_at, param_groups, train
from mambakit.training.data import EOS_ID, batch_at, load_corpus

SMALL = dict(d_model=32, n_layer=2, d_state=8)


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), seq_len=32, batch_size=4, max_steps=6, eval_every=3,
                eval_batches=2, save_every=3, warmup_steps=2, max_corpus_bytes=400_000)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in rows}


def test_cli_trains_on_the_embedded_corpus_and_generate_loads_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out-dir", str(out), "--max-steps", "4", "--seq-len", "32", "--batch-size", "2",
                 "--eval-every", "2", "--eval-batches", "1", "--save-every", "2", "--max-corpus-bytes", "300000",
                 "--d-model", "32", "--n-layer", "1"]) == 0
    err = capsys.readouterr().err
    assert "bits/token" in err and "python stdlib" in err
    assert (out / "loss.png").stat().st_size > 0 and (out / "latest").read_text().strip() == "ckpt-0000004"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "val_loss" in rows[1] and "val_loss" in rows[3]
    assert main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    model = MambaLM.from_pretrained(out)
    assert model.config.d_model == 32 and model.config.vocab_size == 257  # bytes + EOS


def test_resumed_run_equals_uninterrupted(tmp_path):
    whole = _cfg(tmp_path / "a")
    train(whole, SMALL, progress=False)
    first = _cfg(tmp_path / "b", stop_after=2)
    train(first, SMALL, progress=False)
    assert (tmp_path / "b" / "run" / "latest").read_text().strip() == "ckpt-0000002"
    train(_cfg(tmp_path / "b", resume=True), SMALL, progress=False)
    a, b = _losses(whole.out_dir), _losses(first.out_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        np.testing.assert_allclose(a[step][0], b[step][0], rtol=0, atol=1e-6)
        if a[step][1] is not None:
            np.testing.assert_allclose(a[step][1], b[step][1], rtol=0, atol=1e-6)
    wa = MambaLM.from_pretrained(whole.out_dir).state_dict()
    wb = MambaLM.from_pretrained(first.out_dir).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mambakit", "train", "--out-dir", str(out), "--max-steps", "400", "--seq-len", "32",
            "--batch-size", "2", "--eval-every", "1000", "--save-every", "1000", "--max-corpus-bytes", "200000",
            "--d-model", "16", "--n-layer", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM, after saving
    assert "stopped by SIGTERM" in err
    step = int((out / "latest").read_text().strip().split("-")[1])
    assert 2 <= step < 400
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["step"] == step
    # the interrupted run resumes from there (its LR schedule still ends at --max-steps 400)
    resumed = subprocess.run(args + ["--resume", "--stop-after", "2"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "latest").read_text().strip() == f"ckpt-{step + 2:07d}"


def test_data_split_and_batches_are_deterministic(tmp_path):
    a = load_corpus(max_bytes=300_000)
    b = load_corpus(max_bytes=300_000)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) and len(a.val) > 0
    assert a.vocab_size == 257 and (a.train == EOS_ID).any()
    x1, y1 = batch_at(a.train, 5, 3, 16, seed=1)
    x2, y2 = batch_at(a.train, 5, 3, 16, seed=1)
    x3, _ = batch_at(a.train, 6, 3, 16, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert a.unigram_bits_per_token() > 3


def test_pretokenized_corpora(tmp_path):
    tokens = (np.arange(5000) % 1000).astype(np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    tokens.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        c = load_corpus(tmp_path / name)
        assert c.vocab_size == 1000 and len(c.train) + len(c.val) == 5000
        assert np.array_equal(np.concatenate([c.train, c.val]), tokens)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 50)
    (tmp_path / "docs" / "b.md").write_text("# title\n" * 80)
    c = load_corpus(tmp_path / "docs", val_fraction=0.5)  # two files: split inside them
    both = np.concatenate([c.train, c.val])
    assert len(c.train) > 0 and len(c.val) > 0 and (both != EOS_ID).sum() == 600 + 640


def test_no_weight_decay_on_norms_biases_A_D_dt_bias():
    model = MambaLM.from_name("tiny", d_model=32, n_layer=1)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert {"backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.dt_proj.bias",
            "backbone.layers.0.norm.weight", "backbone.norm_f.weight", "backbone.layers.0.mixer.conv1d.bias"} <= no
    assert {"backbone.layers.0.mixer.in_proj.weight", "backbone.embedding.weight"} <= yes and not (no & yes)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("kw,match", [
    (dict(data="/no/such/corpus"), "no such file"), (dict(seq_len=10_000_000), "longer than"),
    (dict(max_steps=0), "--max-steps"), (dict(lr=-1.0), "--lr"), (dict(preset="nope"), "--preset"),
])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train(_cfg(tmp_path, **kw), SMALL, progress=False)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(_cfg(tmp_path, data=str(tmp_path / "empty")), SMALL, progress=False)
    with pytest.raises(SystemExit, match="empty"):
        main(["train", "--data", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "x")])


def test_existing_checkpoint_is_never_overwritten_by_a_failed_run(tmp_path):
    cfg = _cfg(tmp_path, max_steps=2, save_every=2, eval_every=2)
    train(cfg, SMALL, progress=False)
    ckpt = tmp_path / "run" / "ckpt-0000002" / "model.safetensors"
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # a new run, same dir
        train(_cfg(tmp_path, max_steps=2), SMALL, progress=False)
    with pytest.raises(FileNotFoundError):  # a resume that fails on its arguments
        train(_cfg(tmp_path, max_steps=4, resume=True, data="/no/such/corpus"), SMALL, progress=False)
    assert ckpt.read_bytes() == before and (tmp_path / "run" / "latest").read_text().strip() == "ckpt-0000002"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(_cfg(tmp_path, max_steps=2, save_every=2, eval_every=2), SMALL, progress=False)
    path = tmp_path / "run" / "ckpt-0000002" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read"):
        train(_cfg(tmp_path, max_steps=4, resume=True), SMALL, progress=False)


def test_activation_checkpointing_gives_the_same_run(tmp_path):
    """Recomputing each block in the backward changes memory, not the result."""
    train(_cfg(tmp_path / "a", max_steps=3, eval_every=3, save_every=3), SMALL, progress=False)
    train(_cfg(tmp_path / "b", max_steps=3, eval_every=3, save_every=3, activation_checkpointing=True), SMALL,
          progress=False)
    a, b = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    for step in a:
        np.testing.assert_allclose(a[step][0], b[step][0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("chunk_len", [1, 7, 30])
def test_chunked_long_sequence_gradients_equal_full(chunk_len, checkpoint):
    """The loss and every gradient of a sequence run in chunks, with the conv and SSM states
    carried across chunk boundaries, equal those of the whole sequence at once (float64)."""
    from mambakit import MambaConfig
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=40, d_state=4)).double()  # A_log and D too
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 40, (2, 30))
    targets = torch.randint(0, 40, (2, 30))
    full = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    g_full = torch.autograd.grad(full, list(model.parameters()))
    chunked = model.chunked_loss(ids, targets, chunk_len, checkpoint=checkpoint)
    g_chunk = torch.autograd.grad(chunked, list(model.parameters()))
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), g_full, g_chunk):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_training_with_chunks_gives_the_same_run(tmp_path):
    train(_cfg(tmp_path / "a", max_steps=3, eval_every=3, save_every=3), SMALL, progress=False)
    train(_cfg(tmp_path / "b", max_steps=3, eval_every=3, save_every=3, chunk_len=8), SMALL, progress=False)
    a, b = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    for step in a:
        np.testing.assert_allclose(a[step][0], b[step][0], rtol=0, atol=2e-5)


def _word_tokenizer(directory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz \n")}
    vocab["<eos>"] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return vocab


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_prepare_then_train_on_the_tokens(tmp_path, suffix, capsys):
    vocab = _word_tokenizer(tmp_path / "tok")
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"{i}.txt").write_text("hello mamba world\n" * (200 + i))
    out = tmp_path / f"tokens{suffix}"
    assert main(["prepare", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "corpus"),
                 "--out", str(out)]) == 0
    corpus = load_corpus(out)
    tokens = np.concatenate([corpus.train, corpus.val])
    assert (tokens == vocab["<eos>"]).sum() == 4 and tokens[0] == vocab["h"]
    summary = train(_cfg(tmp_path, data=str(out), max_steps=2, eval_every=2, save_every=2), SMALL, progress=False)
    assert summary["val_loss"] is not None
    assert MambaLM.from_pretrained(tmp_path / "run").config.vocab_size >= len(vocab)


def test_prepare_bad_arguments(tmp_path):
    _word_tokenizer(tmp_path / "tok")
    with pytest.raises(SystemExit, match="no such file"):
        main(["prepare", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "none"), "--out", "x.bin"])
    with pytest.raises(SystemExit, match=".bin or .npy"):
        main(["prepare", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path), "--out", "x.txt"])
    with pytest.raises(SystemExit, match="tokenizer"):
        main(["prepare", "--tokenizer", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", "x.bin"])


_TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
_TORCHRUN_ARGS = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--max-corpus-bytes", "300000",
                  "--d-model", "32", "--n-layer", "2", "--device", "cpu"]


def _run_train(launcher, out_dir, args):
    """`mambakit train` in a subprocess, under `launcher` (e.g. torchrun) or alone."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if launcher else None
    result = subprocess.run([sys.executable, *launcher, "-m", "mambakit", "train", "--out-dir", str(out_dir), *args],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_ddp_two_ranks_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m mambakit train` (DDP over gloo on CPU) takes each rank's
    rows of the same global batch: its losses equal a single process's."""
    common = _TORCHRUN_ARGS + ["--max-steps", "3", "--eval-every", "3", "--save-every", "3"]
    _run_train([], tmp_path / "one", common)
    _run_train(_TORCHRUN, tmp_path / "two", common)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        np.testing.assert_allclose(a[step][0], b[step][0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(a[3][1], b[3][1], rtol=0, atol=1e-5)
    assert (tmp_path / "two" / "latest").read_text().strip() == "ckpt-0000003"


def test_torchrun_fsdp2_two_ranks_equals_one_process_and_resumes(tmp_path, capsys):
    """FSDP2 (fully_shard per block and at the root, gloo on CPU): the same losses as one process;
    its checkpoint (gathered on rank 0) resumes under FSDP2 and loads in `generate`."""
    common = _TORCHRUN_ARGS + ["--max-steps", "4", "--eval-every", "2", "--save-every", "2"]
    _run_train([], tmp_path / "one", common)
    _run_train(_TORCHRUN, tmp_path / "two", common + ["--fsdp", "--stop-after", "2"])
    _run_train(_TORCHRUN, tmp_path / "two", common + ["--fsdp", "--resume"])
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        np.testing.assert_allclose(a[step][0], b[step][0], rtol=0, atol=1e-5)
    assert main(["generate", "--model", str(tmp_path / "two"), "--prompt", "ab", "--max-new-tokens", "3"]) == 0


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        train(_cfg(tmp_path, fsdp=True), SMALL, progress=False)


def _saved_bytes(fn):
    """Bytes that autograd keeps for the backward pass while fn() runs (recomputed chunks keep
    only their inputs)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_chunked_training_keeps_activation_memory_flat():
    """With per-chunk recompute, what is kept for the backward pass grows only by the chunk
    boundaries' states: at 8x the length it stays a small fraction of the unchunked run's."""
    from mambakit import MambaConfig
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, d_state=8))
    kept = {}
    for length in (256, 2048):
        ids = torch.randint(0, 64, (1, length))
        kept[length, "chunked"] = _saved_bytes(lambda: model.chunked_loss(ids, ids, 128).backward())
        kept[length, "whole"] = _saved_bytes(lambda: model(ids, targets=ids).backward())
    assert kept[2048, "whole"] > 6 * kept[256, "whole"]  # the plain run keeps activations for every token
    assert kept[2048, "chunked"] < kept[2048, "whole"] / 20
    per_token = kept[2048, "chunked"] / 2048
    assert per_token < 200, per_token  # bytes per token: states at chunk boundaries, not activations


def test_evaluation_of_long_sequences_runs_in_chunks_with_the_same_loss():
    """With --chunk-len, evaluation runs each sequence chunk by chunk (a 1M-token sequence's
    logits would not fit at once); the loss is the same as the whole-sequence loss."""
    import contextlib

    from mambakit.config import MambaConfig
    from mambakit.training.data import Corpus
    from mambakit.training.trainer import evaluate
    rng = np.random.default_rng(0)
    corpus = Corpus(train=rng.integers(0, 256, 4096), val=rng.integers(0, 256, 4096), name="random", vocab_size=257)
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=257, d_state=4), dtype=torch.float64)
    losses, chunked_calls = {}, []
    original = model.chunked_loss
    model.chunked_loss = lambda *a, **k: chunked_calls.append(a[2]) or original(*a, **k)
    for chunk_len in (None, 24):
        cfg = TrainConfig(seq_len=100, batch_size=2, eval_batches=2, chunk_len=chunk_len)
        losses[chunk_len] = evaluate(model, corpus, cfg, "cpu", contextlib.nullcontext)
    assert chunked_calls == [24, 24]  # one chunked call per evaluation batch, none unchunked
    assert losses[24] == pytest.approx(losses[None], rel=1e-12)
