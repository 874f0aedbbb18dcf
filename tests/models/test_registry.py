"""The model registry: every registered name builds through `create_model` and gives outputs of
the right shape (a sweep over all names, in the manner of timm's; tiny overrides keep it fast on
CPU), the old entry points build the same models, and names are checked."""

import pytest
import torch
from torch import nn

import mambakit
from mambakit import MambaLM, VisionMamba, create_model, list_models, register_model
from mambakit.models import registry, vision

TINY = dict(d_model=16, n_layer=1, d_state=4)  # fields that every family's config has


def tiny_overrides(name: str) -> dict:
    """TINY, and what a language-model preset needs on top of it: Mamba-2 heads that divide
    d_inner 32; a hybrid keeps both its kinds of layer, a Mamba layer then an attention layer
    (its preset's attention settings, whose head_dim is explicit), as its preset's attention
    layers would fall outside one layer."""
    preset = mambakit.PRESETS.get(name)
    overrides = dict(TINY)
    if preset is not None and preset.layer == "mamba2":
        overrides["headdim"] = 8
    if preset is not None and preset.attn_layer_idx:
        overrides.update(n_layer=2, attn_layer_idx=[1])
    return overrides


def test_every_preset_is_registered():
    names = list_models()
    assert names == sorted(names) and len(set(names)) == len(names)
    assert set(mambakit.PRESETS) | set(vision.PRESETS) | {"mamba_synthetic", "vim_digits"} <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_runs_forward(name):
    model = create_model(name, **tiny_overrides(name)).eval()
    with torch.no_grad():
        if isinstance(model, MambaLM):
            ids = torch.randint(0, model.config.vocab_size, (2, 5))  # (B, L)
            assert model(ids).shape == (2, 5, model.config.padded_vocab_size)
        elif isinstance(model, VisionMamba):
            h, w = (side * model.cfg.patch_size for side in model.cfg.grid)
            images = torch.randn(2, model.cfg.in_chans, h, w)  # (B, C, H, W)
            assert model(images).shape == (2, model.cfg.num_classes)
        else:
            pytest.fail(f"{name}: a {type(model).__name__}, which this sweep has no input for; add one")


def test_the_old_entry_points_build_the_same_models():
    torch.manual_seed(0)
    a = create_model("130m", n_layer=1, d_model=32)
    torch.manual_seed(0)
    b = MambaLM.from_name("130m", n_layer=1, d_model=32)
    assert a.config == b.config and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    torch.manual_seed(0)
    c = create_model("vim_small", num_classes=3, img_size=32, n_layer=1)
    torch.manual_seed(0)
    d = vision.create_model("vim_small", num_classes=3, img_size=32, n_layer=1)
    assert c.cfg == d.cfg and all(torch.equal(c.state_dict()[k], v) for k, v in d.state_dict().items())
    assert create_model("tiny", dtype=torch.float64).lm_head.weight.dtype == torch.float64


def test_unknown_names_and_fields_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'; choose one of .*vim_tiny"):
        create_model("no-such-model")
    with pytest.raises(ValueError, match="unknown VisionConfig field"):
        create_model("vim_tiny", depth=3)
    with pytest.raises(TypeError):
        create_model("tiny", depth=3)


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # the test's names go with it
    register_model("linear-test", lambda d=4: nn.Linear(d, d))
    assert "linear-test" in list_models() and create_model("linear-test", d=3).weight.shape == (3, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("linear-test", lambda: nn.Identity())
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("", lambda: nn.Identity())
