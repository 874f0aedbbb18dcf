"""save_pretrained killed for real: a child process saves two weight sets into one directory
over and over, in turn in the three formats, and is SIGKILLed at seeded random moments. After
each kill the directory loads as a complete, finite model equal to the save before the kill or
the one it interrupted, in the format its files say; the next save leaves nothing behind.

Run as a script (`python -m tests.checkpoint.test_kill_save DIR FIRST`), this module is the
child: it prints the index of every save it completes."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoint import read_config, resolve_directory

FORMATS = ("mambakit", "hf", "official")
WEIGHTS = {"mambakit": "model.safetensors", "hf": "model.safetensors", "official": "pytorch_model.bin"}
TRIALS, SEED = 6, 2024
ROOT = Path(__file__).resolve().parents[2]


def plan(i: int) -> tuple[str, int]:
    """Save i's (format, weight set): formats in turn, weight sets alternating, so that two
    consecutive saves differ in both."""
    return FORMATS[i % 3], i % 2


@torch.no_grad()
def weight_set(which: int) -> MambaLM:
    """A small untied model whose every weight is recognisable: the set's number plus a small
    deterministic pattern."""
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=4, tie_embeddings=False))
    g = torch.Generator().manual_seed(100 + which)
    for p in model.parameters():
        p.copy_(which + 0.01 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_forever(directory: str, first: int) -> None:
    """The child: saves plan(first), plan(first + 1), ... into directory until killed."""
    models = [weight_set(0), weight_set(1)]
    print("ready", flush=True)
    i = first
    while True:
        fmt, which = plan(i)
        models[which].save_pretrained(directory, format=fmt)
        print(i, flush=True)
        i += 1


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"the saving process wrote nothing for {timeout} s")
    return proc.stdout.readline().strip()


def check(directory: Path, candidates: list[int], sets: list[MambaLM]) -> int:
    """Loads directory; returns which of the candidate saves it holds (it must hold one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice when an interrupted save's old copy is read
        model = MambaLM.from_pretrained(directory)
        found = resolve_directory(directory)
        _, fmt = read_config(found)
    state = model.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())
    weights = {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(found))
    assert weights == {WEIGHTS[fmt]}, (fmt, weights)
    for i in candidates:
        expected_fmt, which = plan(i)
        reference = sets[which].state_dict()
        if fmt == expected_fmt and all(torch.equal(state[k], reference[k]) for k in reference):
            return i
    raise AssertionError(f"{directory} holds a {fmt} checkpoint that is none of the saves {candidates}")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_at_random_moments_leaves_a_checkpoint_that_loads(tmp_path):
    directory = tmp_path / "ckpt"
    sets = [weight_set(0), weight_set(1)]
    sets[plan(0)[1]].save_pretrained(directory, format=plan(0)[0])
    held, rng = 0, random.Random(SEED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for _ in range(TRIALS):
        first = held + 1
        proc = subprocess.Popen([sys.executable, "-m", "tests.checkpoint.test_kill_save", str(directory), str(first)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert read_line(proc, 120) == "ready"
            start = time.monotonic()
            assert read_line(proc, 120) == str(first)  # one complete save: its duration scales the delays
            time.sleep(rng.uniform(0, 3 * (time.monotonic() - start)))
        finally:
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate()
        done = [first] + [int(line) for line in rest.split()]
        last = max(done)
        held = check(directory, [last, last + 1], sets)  # the last complete save, or the one killed
    new = weight_set(1)
    new.save_pretrained(directory, format="hf")
    assert os.listdir(tmp_path) == ["ckpt"]  # no .ckpt.tmp-* / .ckpt.old-* left beside it
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]  # nor temporary files in it
    assert check(directory, [1], sets) == 1


if __name__ == "__main__":
    save_forever(sys.argv[1], int(sys.argv[2]))
