"""Vision Mamba in timm: when timm is installed, importing mambakit registers the Vim presets
as timm models, so that `timm.create_model("vim_tiny_patch16_224", num_classes=..., drop_path_rate=...)`
and timm's training and evaluation scripts (`--model vim_tiny_patch16_224`) build a mambakit
`VisionMamba`.

Each model carries timm's `pretrained_cfg` (input size, normalisation, interpolation, crop, the
classifier's name) for timm's data pipeline. No pretrained weights are published:
`pretrained=True` is refused; load a checkpoint with `model.load_state_dict` (its position
embedding is resized to the model's grid) or timm's `--initial-checkpoint`.

timm is optional: without it (or with a timm whose import fails, e.g. a torchvision built for
another torch) nothing is registered and mambakit works as before."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .vision import PRESETS, VisionConfig, VisionMamba

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm model name -> (mambakit preset, image size)
TIMM_NAMES = {
    "vim_tiny_patch16_224": ("vim_tiny", 224),
    "vim_small_patch16_224": ("vim_small", 224),
    "vim_base_patch16_224": ("vim_base", 224),
}

# timm reads a module's `default_cfgs` when registering its entry points
default_cfgs = {
    name: dict(url="", num_classes=1000, input_size=(3, size, size), pool_size=None, crop_pct=0.875,
               interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
    for name, (_, size) in TIMM_NAMES.items()
}

_GLOBAL_POOL = {"token": "cls", "avg": "mean"}


def build(name: str, pretrained: bool = False, pretrained_cfg: Any = None,
          pretrained_cfg_overlay: dict | None = None, **kwargs: Any) -> VisionMamba:
    """timm's entry point for `name`: timm's keyword arguments (num_classes, in_chans, img_size,
    drop_path_rate, drop_rate 0, global_pool 'token'/'avg') or any VisionConfig field."""
    from timm.models._builder import resolve_pretrained_cfg

    if pretrained:
        raise ValueError(f"{name} has no published pretrained weights; create it with pretrained=False "
                         "and load a checkpoint with load_state_dict")
    preset, size = TIMM_NAMES[name]
    kwargs.pop("pretrained_strict", None)
    kwargs.pop("cache_dir", None)  # timm's download folder (newer timm passes it); nothing is downloaded
    if kwargs.pop("drop_rate", 0.0):
        raise ValueError(f"{name} has no dropout before the head; drop_rate must be 0")
    global_pool = kwargs.pop("global_pool", None)
    if global_pool is not None:
        if global_pool not in _GLOBAL_POOL:
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        kwargs["pool"] = _GLOBAL_POOL[global_pool]
    known = set(VisionConfig.__dataclass_fields__)
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"timm.create_model({name!r}) got unexpected argument(s) {sorted(unknown)}")
    kwargs.setdefault("img_size", size)
    cfg = replace(PRESETS[preset], **kwargs)
    model = VisionMamba(cfg)
    resolved = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                      pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    h, w = cfg.grid
    resolved["input_size"] = (cfg.in_chans, h * cfg.patch_size, w * cfg.patch_size)
    resolved["num_classes"] = cfg.num_classes
    model.pretrained_cfg = model.default_cfg = resolved
    return model


def _entry_point(name: str):
    def create(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
        return build(name, pretrained=pretrained, **kwargs)
    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"Vision Mamba {TIMM_NAMES[name][0]} at {TIMM_NAMES[name][1]} px (mambakit)."
    return create


def register() -> bool:
    """Registers the Vim presets with timm, once; False when timm cannot be imported."""
    try:
        from timm.models import is_model, register_model
    except Exception:  # noqa: BLE001 (no timm, or one that fails to import: nothing to register)
        return False
    for name in TIMM_NAMES:
        if not is_model(name):
            globals()[name] = register_model(_entry_point(name))
    return True
