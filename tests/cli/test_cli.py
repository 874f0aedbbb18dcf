"""`mambakit generate`: runs on a preset with a fixed seed, is reproducible, and rejects bad
arguments with a clear message."""

import subprocess
import sys

import pytest
import torch

from mambakit import MambaLM
from mambakit.cli import main
from mambakit.cli.generate import printable


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


@pytest.mark.parametrize("args,message", [
    (["--top-p", "0"], "--top-p"), (["--min-p", "2"], "--min-p"), (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--prompt", "a long prompt", "--max-prompt-tokens", "4"], "--max-prompt-tokens"),
    (["--temperature", "nan"], "--temperature"), (["--tokenizer", "/no/such/tokenizer"], "--tokenizer"),
])
def test_generate_more_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--max-new-tokens", "2", *args])
    assert message in str(exc.value)


def test_generate_with_sampling_options_and_stop(capsys):
    assert main(["generate", "--prompt", "xy", "--max-new-tokens", "6", "--temperature", "0.9", "--top-p", "0.9",
                 "--min-p", "0.02", "--repetition-penalty", "1.2", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", "--prompt", "xy", "--max-new-tokens", "6", "--temperature", "0.9", "--top-p", "0.9",
                 "--min-p", "0.02", "--repetition-penalty", "1.2", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first
    # a stop string taken from the greedy text ends the output right after it
    assert main(["generate", "--prompt", "xy", "--max-new-tokens", "12"]) == 0
    greedy = capsys.readouterr().out.rstrip("\n")[2:]
    stop = greedy[2:4]
    assert len(stop) == 2 and "\ufffd" not in stop  # the seeded tiny preset's greedy text is printable
    assert main(["generate", "--prompt", "xy", "--max-new-tokens", "12", "--stop", stop]) == 0
    text = capsys.readouterr().out.rstrip("\n")[2:]
    assert text.endswith(stop) and greedy.startswith(text) and len(text) < len(greedy)


def test_tokenizer_from_a_local_directory(tmp_path, capsys):
    """A Hugging Face tokenizer.json beside the checkpoint is used (through `tokenizers`)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    MambaLM.from_name("tiny").save_pretrained(tmp_path)
    from mambakit.tokenizer import load_tokenizer
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("cab") == [2, 0, 1]
    assert main(["generate", "--model", str(tmp_path), "--prompt", "cab", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("cab")
