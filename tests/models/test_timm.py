"""Vision Mamba as a timm model: registered when mambakit is imported, built by timm's factory
with timm's arguments, and usable by timm's optimizer factory and data config. timm pulls
torchvision, so these run where timm is installed (the GPU machine) and skip elsewhere."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import mambakit  # noqa: E402,F401  (registers the Vim presets with timm)
from mambakit.models.encoder import drop_path  # noqa: E402
from mambakit.models.vision import VisionMamba  # noqa: E402


def _small(**kw):
    return timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, d_model=16, n_layer=2, **kw)


def test_the_presets_are_timm_models():
    for name in ("vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224"):
        assert timm.is_model(name)
    assert "vim_tiny_patch16_224" in timm.list_models("vim_*")


def test_timm_builds_a_vision_mamba_with_its_arguments_and_pretrained_cfg():
    model = _small(num_classes=7, in_chans=1, drop_path_rate=0.1)
    assert isinstance(model, VisionMamba)
    assert model.num_classes == 7 and model.cfg.in_chans == 1 and model.cfg.drop_path_rate == 0.1
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 32, 32) and cfg["classifier"] == "head" and cfg["num_classes"] == 7
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 32, 32) and data["interpolation"] == "bicubic"
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_pretrained_weights_are_refused_with_a_message():
    with pytest.raises(ValueError, match="no published pretrained weights"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True)


def test_drop_path_is_stochastic_depth_in_training_only():
    model = _small(num_classes=3, drop_path_rate=0.5)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)  # different layers dropped
    hidden = torch.ones(1000, 2, 3)
    dropped = drop_path(hidden, 0.25, training=True)
    kept = dropped[:, 0, 0] != 0
    assert 0.65 < kept.float().mean() < 0.85  # about 1 - rate of the samples kept
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / 0.75))  # rescaled


def test_timm_optimizer_factory_and_classifier_reset():
    model = _small(num_classes=3)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    model.reset_classifier(5, global_pool="avg")
    assert model.get_classifier().out_features == 5 and model.cfg.pool == "mean"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
