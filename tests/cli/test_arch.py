"""--arch, the model family on the command line: `train --arch mamba2 --preset 130m` is the
mamba2-130m preset, `--preset mamba2-130m` alone still works, a preset of the other family is
one `error:` line naming both flags, and the help tells of it."""

import json

import pytest
import torch

import mambakit.cli.train as cli_train
from mambakit import MambaConfig, MambaLM
from mambakit.cli import main


def test_a_tiny_mamba2_run_from_arch_and_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--arch", "mamba2", "--preset", "tiny", "--out-dir", str(out), "--max-steps", "2",
                 "--seq-len", "16", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
                 "--save-every", "2", "--max-corpus-bytes", "100000", "--d-model", "32", "--n-layer", "1"]) == 0
    assert "bits/token" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    config = MambaLM.from_pretrained(out).config
    # mamba2-tiny's values (headdim 32, d_state 16) under the model flags' overrides
    assert (config.layer, config.headdim, config.d_state, config.d_model) == ("mamba2", 32, 16, 32)


@pytest.mark.parametrize("flags,preset", [
    ([], "tiny"),
    (["--arch", "mamba2"], "mamba2-tiny"),
    (["--arch", "mamba2", "--preset", "130m"], "mamba2-130m"),
    (["--preset", "mamba2-130m"], "mamba2-130m"),
    (["--arch", "mamba2", "--preset", "mamba2-370m"], "mamba2-370m"),
    (["--arch", "mamba1", "--preset", "130m"], "130m"),
    (["--arch", "mamba1", "--preset", "790m"], "790m"),
    (["--arch", "mamba1", "--layer", "s4d"], "tiny"),  # S4D layers in a Mamba-1 shape
])
def test_arch_names_the_preset(monkeypatch, flags, preset):
    seen = {}
    monkeypatch.setattr(cli_train, "train", lambda cfg, overrides: seen.update(preset=cfg.preset) or {"step": 0})
    assert main(["train", *flags]) == 0
    assert seen["preset"] == preset


@pytest.mark.parametrize("flags,both", [
    (["--arch", "mamba1", "--preset", "mamba2-130m"], ("--arch mamba1", "--preset mamba2-130m")),
    (["--arch", "mamba2", "--preset", "790m"], ("--arch mamba2", "--preset 790m")),
    (["--arch", "mamba1", "--layer", "mamba2"], ("--arch mamba1", "--layer mamba2")),
])
def test_a_preset_of_the_other_family_is_one_error_line(monkeypatch, flags, both):
    assert_train_refuses(monkeypatch, flags, both)


def assert_train_refuses(monkeypatch, flags, named):
    """`mambakit train FLAGS` stops before training with one `error:` line naming each of `named`."""
    monkeypatch.setattr(cli_train, "train", lambda *a: pytest.fail(f"trained despite {flags}"))
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags])
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert all(part in message for part in named), message


def test_help_mentions_arch(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("train", "generate"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--arch {mamba1,mamba2,hybrid}" in text and "mamba2-130m" in text and "hybrid-130m" in text, command


def test_generate_maps_the_preset_and_refuses_a_checkpoint_of_the_other_family(tmp_path, capsys):
    assert main(["generate", "--arch", "mamba2", "--model", "tiny", "--max-new-tokens", "2"]) == 0
    assert "preset 'mamba2-tiny'" in capsys.readouterr().err
    MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=256, d_state=4)).save_pretrained(tmp_path / "m1")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--arch", "mamba2", "--model", str(tmp_path / "m1"), "--max-new-tokens", "2"])
    message = str(exc.value.code)
    assert message.startswith("error: --arch mamba2 and --model") and "mamba1" in message
