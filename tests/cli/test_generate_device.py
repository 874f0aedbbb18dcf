"""`mambakit generate --device`: auto (the default, as in the other commands) is cuda when there
is one, else cpu; a name that is not a device is one `error:` line."""

import pytest
import torch

from mambakit.cli import build_parser, main


def test_generate_runs_with_device_auto_the_default(capsys):
    args = build_parser().parse_args(["generate"])
    assert args.device == "auto"
    flags = ["generate", "--prompt", "ab", "--max-new-tokens", "3"]
    assert main(flags + ["--device", "auto"]) == 0
    auto = capsys.readouterr().out
    assert main(flags) == 0
    assert capsys.readouterr().out == auto
    if not torch.cuda.is_available():  # auto is the cpu here: the same text
        assert main(flags + ["--device", "cpu"]) == 0
        assert capsys.readouterr().out == auto


def test_generate_refuses_a_device_that_is_not_one():
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--device", "tpu", "--max-new-tokens", "2"])
    assert str(exc.value).startswith("error: --device must be auto, cpu, cuda, cuda:N or mps")
