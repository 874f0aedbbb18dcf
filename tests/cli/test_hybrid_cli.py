"""Hybrids on the command line: `train --arch hybrid --attn-layers ...` trains a model with
attention at those layers and saves it, --arch hybrid names the hybrid presets' sizes, a bad
--attn-layers (or one that disagrees with --arch or --n-layer) is one `error:` line naming the
flag before anything trains, and `generate --arch hybrid` decodes the hybrid preset."""

import json

import pytest
import torch

import mambakit.cli.train as cli_train
from mambakit import MambaLM, PRESETS
from mambakit.cli import main
from mambakit.modules import Attention, Mamba2
from tests.cli.test_arch import assert_train_refuses

FAST = ["--max-steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1",
        "--save-every", "2", "--max-corpus-bytes", "100000"]


def test_a_tiny_hybrid_run_from_arch_and_attn_layers(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--arch", "hybrid", "--preset", "tiny", "--attn-layers", "1", "--out-dir", str(out),
                 "--d-model", "32", "--n-layer", "3", *FAST]) == 0
    assert "bits/token" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = json.loads((out / "ckpt-0000002" / "config.json").read_text())
    assert saved["attn_layer_idx"] == [1]
    model = MambaLM.from_pretrained(out)
    # hybrid-tiny's Mamba-2 layers and attention settings, attention where --attn-layers says
    assert [type(b.mixer) for b in model.backbone.layers] == [Mamba2, Attention, Mamba2]
    assert model.config.attn_cfg == PRESETS["hybrid-tiny"].attn_cfg and model.config.layer_pattern == "mam"


@pytest.mark.parametrize("flags,preset,attn_layers", [
    (["--arch", "hybrid"], "hybrid-tiny", None),
    (["--arch", "hybrid", "--preset", "130m"], "hybrid-130m", None),
    (["--arch", "hybrid", "--preset", "hybrid-130m", "--attn-layers", "0,-1"], "hybrid-130m", [0, 23]),
    (["--arch", "hybrid", "--attn-layers", "amma"], "hybrid-tiny", [0, 3]),
    (["--arch", "hybrid", "--n-layer", "2", "--attn-layers", "1"], "hybrid-tiny", [1]),
    (["--arch", "hybrid", "--layer", "mamba"], "hybrid-tiny", None),  # Mamba-1 layers among the attention
    (["--preset", "hybrid-tiny", "--attn-layers", "mmmm"], "hybrid-tiny", []),  # no --arch: none is allowed
])
def test_arch_hybrid_names_the_preset_and_attn_layers_the_indices(monkeypatch, flags, preset, attn_layers):
    seen = {}
    monkeypatch.setattr(cli_train, "train",
                        lambda cfg, overrides: seen.update(preset=cfg.preset, overrides=overrides) or {"step": 0})
    assert main(["train", *flags]) == 0
    assert seen["preset"] == preset
    assert seen["overrides"].get("attn_layer_idx") == attn_layers


@pytest.mark.parametrize("flags,named", [
    (["--arch", "hybrid", "--attn-layers", "9"], ["--attn-layers", "0..3"]),  # hybrid-tiny has 4 layers
    (["--arch", "hybrid", "--attn-layers", "-5"], ["--attn-layers", "0..3"]),
    (["--arch", "hybrid", "--attn-layers", "x"], ["--attn-layers"]),
    (["--arch", "hybrid", "--attn-layers", "1,x"], ["--attn-layers"]),
    (["--arch", "hybrid", "--attn-layers", "1,1"], ["--attn-layers", "twice"]),
    (["--arch", "hybrid", "--attn-layers", "mam"], ["--attn-layers", "3 letters"]),
    (["--arch", "hybrid", "--attn-layers", "mmmm"], ["--arch hybrid", "--attn-layers"]),
    (["--arch", "hybrid", "--preset", "130m", "--n-layer", "12", "--attn-layers", "12"], ["--attn-layers", "0..11"]),
    (["--arch", "mamba2", "--attn-layers", "1"], ["--arch mamba2", "--attn-layers"]),
    (["--attn-layers", "1"], ["--attn-layers", "--attn-cfg"]),  # the tiny preset has no attention settings
    (["--arch", "hybrid", "--n-layer", "2"], ["--n-layer 2", "--attn-layers"]),  # cuts off hybrid-tiny's layer 2
])
def test_a_bad_attn_layers_is_one_error_line_naming_the_flag(monkeypatch, flags, named):
    assert_train_refuses(monkeypatch, flags, named)


def test_help_shows_attn_layers_and_the_hybrid_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--attn-layers LIST" in text and "'mmam'" in text
    table = text[text.index("the presets"):]
    (row,) = [ln.split() for ln in table.splitlines() if ln.split()[:1] == ["hybrid-130m"]]
    assert row[-1] == "6,12,18"  # the --attn-layers column
    assert "hybrid-130m: --attn-cfg '{\"num_heads\":12," in table


def test_generate_arch_hybrid_decodes_the_hybrid_preset_and_refuses_a_pure_mamba(tmp_path, capsys):
    assert main(["generate", "--arch", "hybrid", "--model", "tiny", "--max-new-tokens", "2"]) == 0
    assert "preset 'hybrid-tiny'" in capsys.readouterr().err
    MambaLM.from_name("mamba2-tiny", d_model=32, n_layer=1).save_pretrained(tmp_path / "m2")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--arch", "hybrid", "--model", str(tmp_path / "m2"), "--max-new-tokens", "2"])
    message = str(exc.value.code)
    assert message.startswith("error: --arch hybrid and --model") and "mamba2" in message
    MambaLM.from_name("hybrid-tiny", d_model=32, n_layer=2, attn_layer_idx=[0]).save_pretrained(tmp_path / "h")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--arch", "mamba2", "--model", str(tmp_path / "h"), "--max-new-tokens", "2"])
    assert str(exc.value.code).startswith("error: --arch mamba2 and --model") and "hybrid" in str(exc.value.code)
    hybrid = MambaLM.from_pretrained(tmp_path / "h")
    assert [type(b.mixer) for b in hybrid.backbone.layers] == [Attention, Mamba2]
