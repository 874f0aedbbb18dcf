"""`mambakit train` killed (SIGKILL) at random moments and in the middle of saves, saving every
step: after each kill, `latest` names a complete, finite checkpoint whose trainer.pt loads with
weights_only=True and holds the step of its name, `--resume` continues from it, and the killed
saves' temporaries are cleaned up. A few trials by default; KILL_TEST_TRIALS=N runs a longer
sweep."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import torch

import mambakit
from mambakit.models.lm import MambaLM
from mambakit.training.checkpoints import read_trainer_state
from mambakit.training.metrics import read_metrics

REPO = pathlib.Path(mambakit.__file__).resolve().parent.parent
TRIALS = int(os.environ.get("KILL_TEST_TRIALS", "3"))


def _args(out, data, *extra):
    return [sys.executable, "-m", "mambakit.cli", "train", "--out-dir", str(out), "--data", str(data),
            "--seq-len", "16", "--batch-size", "2", "--max-steps", "100000", "--save-every", "1",
            "--eval-every", "100000", "--eval-batches", "1", "--warmup-steps", "1",
            "--d-model", "16", "--n-layer", "1", "--d-state", "4", *extra]


def _latest_step(out) -> int | None:
    try:
        return int((out / "latest").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _assert_complete_and_finite(out) -> int:
    """The step of the checkpoint `latest` names, after checking that it loads and is finite."""
    name = (out / "latest").read_text().strip()
    step = int(name.split("-")[1])
    model = MambaLM.from_pretrained(out)  # `latest`, through mambakit's loader
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    state = torch.load(out / name / "trainer.pt", map_location="cpu", weights_only=True)
    assert state["step"] == step and read_trainer_state(out / name)["step"] == step
    tensors = [state["rng_cpu"], *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return step


def _start(args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_sigkill_at_random_moments_leaves_a_complete_checkpoint_that_resumes(tmp_path):
    rng = random.Random(27)
    data = tmp_path / "corpus.txt"
    data.write_text(" ".join(rng.choice(["mamba", "state", "space", "scan", "\n"]) for _ in range(6000)))
    out = tmp_path / "run"
    previous = None
    for trial in range(TRIALS):
        proc = _start(_args(out, data, *(["--resume"] if trial else [])))
        try:
            deadline = time.time() + 120
            while _latest_step(out) in (None, previous):  # this process has written a checkpoint
                assert proc.poll() is None, f"trial {trial}: {proc.communicate()[1][-3000:]}"
                assert time.time() < deadline, f"trial {trial}: no checkpoint written"
                time.sleep(0.02)
            if trial % 2:  # in the middle of a save: once its temporary directory exists
                while not list(out.glob(f".tmp-ckpt-*-{proc.pid}")) and time.time() < deadline:
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(0.0, 0.6))  # somewhere in a step or a save
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        step = _assert_complete_and_finite(out)
        assert previous is None or step > previous
        previous = step
    resumed = subprocess.run(_args(out, data, "--resume", "--stop-after", "1"), capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _assert_complete_and_finite(out) == previous + 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", 10**9)] == list(range(1, previous + 2))
    assert not list(out.glob(".tmp-ckpt-*"))  # the killed runs' temporaries are gone
