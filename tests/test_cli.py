"""`mambakit generate`: runs on a preset with a fixed seed, is reproducible, and rejects bad
arguments with a clear message."""

import subprocess
import sys

import pytest
import torch

from mambakit import MambaLM
from mambakit.cli import main, printable


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mambakit", *args], capture_output=True, text=True, timeout=120)


def test_generate_preset_is_reproducible_and_reports_speed():
    a = run_cli("generate", "--model", "tiny", "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "1.0",
                "--seed", "3")
    b = run_cli("generate", "--model", "tiny", "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "1.0",
                "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("hello")
    assert "RANDOM weights" in a.stderr and "ms/step" in a.stderr and "tokens/s" in a.stderr


def test_generate_from_checkpoint_directory(tmp_path, capsys):
    torch.manual_seed(0)
    model = MambaLM.from_name("tiny")
    model.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    ids = model.eval().generate(torch.tensor([list(b"ab")]), max_new_tokens=5)[0, 2:].tolist()
    assert out.out.rstrip("\n") == "ab" + printable(bytes(ids).decode("utf-8", errors="replace"))
    assert "RANDOM" not in out.err


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-preset-or-dir"], "no-such-preset-or-dir"),
    (["--temperature", "-1"], "--temperature"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", ""], "--prompt"),
])
def test_generate_bad_arguments(args, message):
    result = run_cli("generate", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
