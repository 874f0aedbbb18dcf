"""`mambakit train` does not run code from a checkpoint, follows `latest` only inside the run,
never replaces a finite checkpoint by a non-finite one, refuses a resume with other settings,
exits 130 / 143 after a signal, bounds what it reads, and turns bad input into one clear error."""

import json
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import mambakit
from mambakit.cli import main
from mambakit.models.lm import MambaLM
from mambakit.tasks.fit import FitConfig, fit
from mambakit.training import TrainConfig, load_corpus, train
from mambakit.training.checkpoints import latest_checkpoint, save_checkpoint
from mambakit.training.data import EOS_ID
from mambakit.training.metrics import read_metrics
from mambakit.training.trainer import model_config_for

SMALL = dict(d_model=16, n_layer=1, d_state=4)
SMALL_FLAGS = ["--d-model", "16", "--n-layer", "1", "--d-state", "4"]
REPO = pathlib.Path(mambakit.__file__).resolve().parent.parent
WORDS = ["alpha", "beta", "gamma", "delta", "mamba", "state", "space", "model", "scan", "token", "\n"]


def _corpus(directory, name="corpus.txt", seed=0):
    path = directory / name
    if not path.exists():
        rng = random.Random(seed)
        path.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    return str(path)


def _cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), data=_corpus(tmp_path), seq_len=16, batch_size=2, max_steps=2,
                eval_every=100, eval_batches=1, save_every=2, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def _cli(tmp_path, *extra):
    return ["train", "--out-dir", str(tmp_path / "run"), "--data", _corpus(tmp_path), "--seq-len", "16",
            "--batch-size", "2", "--eval-every", "100", "--eval-batches", "1", "--save-every", "2",
            "--warmup-steps", "1", *SMALL_FLAGS, *extra]


def _cli_error(argv) -> str:
    """The message of a CLI run that must fail with one `error:` line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _snapshot(out_dir):
    """`latest` and the bytes of every file of the checkpoint it names."""
    ckpt = out_dir / (out_dir / "latest").read_text().strip()
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())} | {"latest": (out_dir / "latest").read_text()}


def _assert_finite_checkpoint(out_dir, step):
    assert (out_dir / "latest").read_text().strip() == f"ckpt-{step:07d}"
    model = MambaLM.from_pretrained(out_dir)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    state = torch.load(out_dir / f"ckpt-{step:07d}" / "trainer.pt", weights_only=True)
    assert state["step"] == step


class _Touch:
    """Unpickles into a call of Path.touch: what a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


# ---- 1. nothing is unpickled with code execution ---------------------------------------------

def test_resume_refuses_a_trainer_state_that_would_run_code(tmp_path):
    train(_cfg(tmp_path), SMALL, progress=False)
    file = tmp_path / "run" / "ckpt-0000002" / "trainer.pt"
    state = torch.load(file, weights_only=True)  # what the trainer stores loads safely
    marker = tmp_path / "pwned"
    torch.save({**state, "extra": _Touch(marker)}, file)
    with pytest.raises(ValueError, match=r"trainer\.pt is not a trainer state that loads safely"):
        train(_cfg(tmp_path, max_steps=4, resume=True), SMALL, progress=False)
    assert not marker.exists()


def test_task_trainer_refuses_a_state_that_would_run_code(tmp_path):
    model = torch.nn.Linear(4, 1)
    batches = lambda step: (torch.ones(2, 4) * step, torch.zeros(2, 1))  # noqa: E731
    loss_fn = lambda m, x, y: ((m(x) - y) ** 2).mean()  # noqa: E731
    cfg = dict(max_steps=2, warmup_steps=0, eval_every=10, state_path=str(tmp_path / "fit_state.pt"))
    fit(model, batches, loss_fn, FitConfig(**cfg), progress=False)
    state = torch.load(tmp_path / "fit_state.pt", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "extra": _Touch(marker)}, tmp_path / "fit_state.pt")
    with pytest.raises(ValueError, match="fit_state.pt holds objects other than tensors"):
        fit(model, batches, loss_fn, FitConfig(**cfg, resume=True), progress=False)
    assert not marker.exists()


# ---- 2. `latest` names a checkpoint of the run only --------------------------------------------

@pytest.mark.parametrize("target", ["../elsewhere", "ABSOLUTE", "ckpt-0000002/../../elsewhere", "ckpt-12x"])
def test_latest_pointing_outside_the_run_is_refused(tmp_path, target):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "trainer.pt").write_bytes(b"")
    out = tmp_path / "run"
    (out / "ckpt-0000002").mkdir(parents=True)
    (out / "ckpt-12x").mkdir()
    (out / "ckpt-12x" / "trainer.pt").write_bytes(b"")
    (out / "latest").write_text((str(elsewhere) if target == "ABSOLUTE" else target) + "\n")
    with pytest.raises(ValueError, match=r"run/latest must name a ckpt-<step> directory"):
        latest_checkpoint(out)
    with pytest.raises(ValueError, match=r"run/latest must name"):
        train(_cfg(tmp_path, resume=True), SMALL, progress=False)


def test_overwrite_starts_over_past_a_broken_latest(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("../elsewhere\n")
    train(_cfg(tmp_path, overwrite=True), SMALL, progress=False)
    _assert_finite_checkpoint(tmp_path / "run", 2)


# ---- 3. a non-finite run never replaces a finite checkpoint ------------------------------------

@pytest.mark.parametrize("field,value", [
    ("weight_decay", float("nan")), ("weight_decay", float("inf")), ("grad_clip", float("nan")),
    ("grad_clip", float("inf")), ("grad_clip", -1.0), ("beta1", float("nan")), ("beta1", 1.0), ("beta2", -0.1),
    ("beta2", float("nan")), ("warmup_steps", -1), ("warmup_steps", 1.5), ("seed", -1), ("max_corpus_bytes", 0),
])
def test_nonfinite_or_out_of_range_hyperparameters_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"--{field.replace('_', '-')} must be .*, got {value!r}"):
        TrainConfig(**{field: value}).check()


def test_resume_with_nan_grad_clip_keeps_the_good_checkpoint(tmp_path):
    train(_cfg(tmp_path), SMALL, progress=False)
    before = _snapshot(tmp_path / "run")
    message = _cli_error(_cli(tmp_path, "--max-steps", "4", "--resume", "--grad-clip", "nan"))
    assert "--grad-clip must be a finite number >= 0" in message
    assert _snapshot(tmp_path / "run") == before


def _nan_loss_at_training_call(monkeypatch, call):
    """MambaLM's forward gives a NaN loss at its `call`-th training loss (1-based)."""
    original, calls = MambaLM.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and kwargs.get("targets") is not None:
            calls[0] += 1
            if calls[0] == call:
                out = out * float("nan")
        return out
    monkeypatch.setattr(MambaLM, "forward", forward)


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_finite_state(tmp_path, monkeypatch):
    _nan_loss_at_training_call(monkeypatch, 3)
    with pytest.raises(ValueError, match=r"step 3: the loss is nan .* not finite; .*--skip-nonfinite.*step 2"):
        train(_cfg(tmp_path, max_steps=4, save_every=100), SMALL, progress=False)
    _assert_finite_checkpoint(tmp_path / "run", 2)  # the state before the bad step, saved on stopping
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", 100)] == [1, 2]


def test_skip_nonfinite_skips_the_step_without_an_update(tmp_path, monkeypatch):
    _nan_loss_at_training_call(monkeypatch, 3)
    summary = train(_cfg(tmp_path, max_steps=4, skip_nonfinite=True), SMALL, progress=False)
    assert summary["step"] == 4 and math.isfinite(summary["val_loss"])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", 100)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "loss" not in rows[2] and rows[2]["skipped"].startswith("loss nan")
    _assert_finite_checkpoint(tmp_path / "run", 4)
    optimizer_steps = torch.load(tmp_path / "run" / "ckpt-0000004" / "trainer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer_steps["optimizer"]["state"].values()} == {3.0}  # one skipped


def test_save_checkpoint_refuses_a_nonfinite_state(tmp_path):
    cfg = _cfg(tmp_path)
    train(cfg, SMALL, progress=False)
    before = _snapshot(tmp_path / "run")
    model = MambaLM.from_pretrained(tmp_path / "run")
    with torch.no_grad():
        model.backbone.layers[0].mixer.in_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="in_proj.weight is not finite; no checkpoint written"):
        save_checkpoint(tmp_path / "run", model, torch.optim.AdamW(model.parameters()), 3, cfg)
    assert _snapshot(tmp_path / "run") == before and not (tmp_path / "run" / "ckpt-0000003").exists()


# ---- 5. a resume continues the same run ----------------------------------------------------------

def test_resume_with_other_settings_is_refused_listing_them(tmp_path):
    train(_cfg(tmp_path), SMALL, progress=False)
    before = _snapshot(tmp_path / "run")
    other = _corpus(tmp_path, "other.txt", seed=1)
    with pytest.raises(ValueError, match=r"other settings \(--data .*other.txt', --seq-len 16 -> 8, --lr 0.004 -> "
                                         r"0.001, --seed 0 -> 3\).*--allow-config-change"):
        train(_cfg(tmp_path, max_steps=4, resume=True, data=other, seq_len=8, lr=1e-3, seed=3), SMALL,
              progress=False)
    message = _cli_error(_cli(tmp_path, "--max-steps", "4", "--resume", "--batch-size", "4"))
    assert "--batch-size 2 -> 4" in message
    assert _snapshot(tmp_path / "run") == before


def test_allow_config_change_continues_and_lists_the_changes(tmp_path, capsys):
    train(_cfg(tmp_path), SMALL, progress=False)
    # extending the run and how often it evaluates and saves need no flag
    train(_cfg(tmp_path, max_steps=3, eval_every=1, save_every=1, resume=True), SMALL, progress=False)
    summary = train(_cfg(tmp_path, max_steps=4, lr=1e-3, resume=True, allow_config_change=True), SMALL,
                    progress=False)
    assert summary["step"] == 4
    assert "--resume with changed settings: --lr 0.004 -> 0.001" in capsys.readouterr().err


def test_resume_of_a_finished_run_asks_for_more_steps(tmp_path):
    train(_cfg(tmp_path), SMALL, progress=False)
    with pytest.raises(ValueError, match=r"ckpt-0000002 is at step 2 and --max-steps is 2; raise --max-steps"):
        train(_cfg(tmp_path, resume=True), SMALL, progress=False)


# ---- 6. signals: saved, then 130 / 143 ----------------------------------------------------------

def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def popen():
    """Starts `mambakit` processes (PYTHONPATH: this checkout); kills those still running at the end."""
    started = []

    def start(argv):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        started.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                        cwd=REPO))
        return started[-1]
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigint_saves_then_exits_130(tmp_path, popen):
    out = tmp_path / "run"
    proc = popen([sys.executable, "-m", "mambakit.cli", *_cli(tmp_path, "--max-steps", "100000", "--save-every",
                                                                "1000")])
    _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1,
              proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGINT" in err and "Traceback" not in err
    step = int((out / "latest").read_text().strip().split("-")[1])
    _assert_finite_checkpoint(out, step)
    assert read_metrics(out / "metrics.jsonl", 10**9)[-1]["step"] == step


SLOW_SAVE = """
import pathlib, sys, time
from mambakit.cli import main
from mambakit.training import trainer
flag, saving = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
real = trainer.save_checkpoint
def slow(*args, **kwargs):
    if flag.exists():  # a save that takes a minute
        saving.touch()
        time.sleep(60)
    return real(*args, **kwargs)
trainer.save_checkpoint = slow
sys.exit(main(sys.argv[3:]))
"""


def test_a_second_ctrl_c_aborts_without_waiting_for_the_save(tmp_path, popen):
    out, flag, saving = tmp_path / "run", tmp_path / "slow", tmp_path / "saving"
    proc = popen([sys.executable, "-c", SLOW_SAVE, str(flag), str(saving),
                   *_cli(tmp_path, "--max-steps", "100000", "--save-every", "1")])
    _wait_for(lambda: (out / "latest").exists(), proc)
    flag.touch()
    _wait_for(saving.exists, proc)
    before = _snapshot(out)
    proc.send_signal(signal.SIGINT)  # asks for a save and a stop: the save hangs
    time.sleep(0.5)
    started = time.time()
    proc.send_signal(signal.SIGINT)  # aborts at once
    _, err = proc.communicate(timeout=30)
    assert time.time() - started < 20
    assert proc.returncode == 130, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith("error: a second SIGINT while stopping; aborted without saving")
    assert _snapshot(out) == before
    _assert_finite_checkpoint(out, int(before["latest"].strip().split("-")[1]))


# ---- 8. a stray huge token id does not grow the model ------------------------------------------

def test_a_token_id_beyond_the_presets_vocabulary_is_refused_naming_the_file_and_the_id(tmp_path):
    tokens = (np.arange(5000) % 200).astype(np.uint32)
    tokens[1234] = 70000
    np.save(tmp_path / "t.npy", tokens)
    corpus = load_corpus(tmp_path / "t.npy")
    with pytest.raises(ValueError, match=r"t\.npy: its largest token id is 70000, .*--vocab-size 70001"):
        model_config_for(TrainConfig(), corpus, {})
    with pytest.raises(ValueError, match=r"--vocab-size 1000 does not cover the largest token id 70000 .*t\.npy"):
        model_config_for(TrainConfig(), corpus, {"vocab_size": 1000})
    assert model_config_for(TrainConfig(), corpus, {"vocab_size": 70001}).vocab_size == 70001  # asked for


# ---- 9. --max-corpus-bytes bounds what is read ---------------------------------------------------

def _text_tokens(corpus):
    both = np.concatenate([corpus.train, corpus.val])
    return int((both != EOS_ID).sum())


def test_max_corpus_bytes_bounds_each_file_too(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 10_000)
    assert _text_tokens(load_corpus(tmp_path / "big.txt", max_bytes=1000)) == 1000
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text("y" * 600)
    assert _text_tokens(load_corpus(tmp_path / "docs", max_bytes=1000)) == 1000
    np.save(tmp_path / "t.npy", np.arange(5000, dtype=np.uint16))
    corpus = load_corpus(tmp_path / "t.npy", max_bytes=2000)
    assert len(corpus.train) + len(corpus.val) == 1000  # 2000 bytes of uint16


# ---- 10. bad input is one clear error ------------------------------------------------------------

def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    train(_cfg(tmp_path), SMALL, progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 5.4, "l')  # a kill while writing step 3's row
    train(_cfg(tmp_path, max_steps=3, resume=True), SMALL, progress=False)
    assert "metrics.jsonl line 3 is torn" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_broken_metrics_line_names_the_file_and_the_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 5.0}\ngarbage\n{"step": 2, "loss": 4.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not a metrics row"):
        read_metrics(metrics, 10)


def test_an_out_dir_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ValueError, match=r"--out-dir .*run is a file, not a directory"):
        train(_cfg(tmp_path), SMALL, progress=False)
    assert "--out-dir" in _cli_error(_cli(tmp_path, "--max-steps", "2"))


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "xla"])
def test_an_unknown_device_is_a_clear_error(tmp_path, device):
    with pytest.raises(ValueError, match=rf"--device must be auto, cpu, cuda, cuda:N or mps, got '{device}'"):
        train(_cfg(tmp_path, device=device), SMALL, progress=False)
    assert "--device must be" in _cli_error(_cli(tmp_path, "--max-steps", "2", "--device", device))


def test_a_trainer_state_without_its_optimizer_is_a_clear_error(tmp_path):
    train(_cfg(tmp_path), SMALL, progress=False)
    file = tmp_path / "run" / "ckpt-0000002" / "trainer.pt"
    state = torch.load(file, weights_only=True)
    del state["optimizer"]
    torch.save(state, file)
    with pytest.raises(ValueError, match=r"trainer\.pt is not a complete trainer state: it lacks optimizer"):
        train(_cfg(tmp_path, max_steps=4, resume=True), SMALL, progress=False)
    assert "lacks optimizer" in _cli_error(_cli(tmp_path, "--max-steps", "4", "--resume"))
