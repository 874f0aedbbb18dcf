"""Flags made from dataclass fields: one --flag per field of a config, so that the command
line follows the config without a list kept by hand. Every boolean option of the command line
is a --name / --no-name pair (argparse.BooleanOptionalAction). And --arch, the model family,
which names the presets' sizes for `train --preset` and `generate --model`, and --attn-layers,
a hybrid's attention layers (the model field attn_layer_idx)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config import PRESETS, layer_indices

# the model family -> the prefix of its preset names
ARCHS = {"mamba1": "", "mamba2": "mamba2-", "hybrid": "hybrid-"}
ARCH_HELP = ("the model family: mamba1 (the default), mamba2 (SSD) or hybrid (Mamba-2 layers with attention "
             "layers, --attn-layers); the preset names its sizes: --arch mamba2 --preset 130m is mamba2-130m, "
             "--arch hybrid --preset 130m is hybrid-130m")
ATTN_LAYERS_HELP = ("the attention layers of a hybrid (--arch hybrid): their indices, '3,7' (negative ones count "
                    "from the end), or one letter per layer, 'mmam' (a = attention, m = Mamba)")


def arch_of(config) -> str:
    """The family of a MambaConfig: hybrid with attention layers, else mamba2 for layer='mamba2',
    else mamba1 (S4D layers included)."""
    if config.attn_layer_idx:
        return "hybrid"
    return "mamba2" if config.layer == "mamba2" else "mamba1"


def presets_of(arch: str) -> list[str]:
    """The preset names of a family, as --arch takes them (mamba2-130m is 130m)."""
    return [name[len(ARCHS[arch]):] for name, cfg in PRESETS.items() if arch_of(cfg) == arch]


def add_arch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=list(ARCHS), default=None, help=ARCH_HELP)


def preset_for_arch(preset: str, arch: str | None, flag: str = "--preset") -> str:
    """The preset that `flag` (--preset, or generate's --model) names under --arch: `preset`
    itself without --arch or when it is already of that family, else the family's preset of that
    size (--arch mamba2 --preset 130m: mamba2-130m). A name that is no preset is returned as it
    is (a checkpoint, or a typo that the caller reports). A preset of the other family is a
    ValueError naming both flags."""
    if arch is None or preset not in PRESETS and ARCHS[arch] + preset not in PRESETS:
        return preset
    if preset in PRESETS and arch_of(PRESETS[preset]) == arch:
        return preset
    if ARCHS[arch] + preset in PRESETS and arch_of(PRESETS[ARCHS[arch] + preset]) == arch:
        return ARCHS[arch] + preset
    raise ValueError(f"--arch {arch} and {flag} {preset} disagree: {preset} is a {arch_of(PRESETS[preset])} preset; "
                     f"with --arch {arch}, {flag} takes {', '.join(presets_of(arch))}")


def check_arch_layer(arch: str | None, layer: str | None) -> None:
    """--arch and --layer, when both are given, must name the same family (mamba2 is layer
    mamba2; mamba1 is layer mamba or s4d; a hybrid's Mamba layers may be any): a ValueError
    naming both otherwise."""
    if arch in ("mamba1", "mamba2") and layer is not None and (layer == "mamba2") != (arch == "mamba2"):
        raise ValueError(f"--arch {arch} and --layer {layer} disagree: --arch mamba2 is --layer mamba2, "
                         f"--arch mamba1 is --layer mamba or s4d")


def attn_layers_for(text: str, n_layer: int, arch: str | None) -> list[int]:
    """The layer indices of --attn-layers for a model of n_layer layers: "3,7" (negative ones
    from the end) or a pattern of a/m letters ("mmam"), each index in [0, n_layer) and named
    once; under --arch hybrid at least one, under --arch mamba1 / mamba2 none. A ValueError
    naming the flag otherwise."""
    indices = layer_indices(f"--attn-layers {text!r}", text, n_layer)  # the config's own checks
    if arch == "hybrid" and not indices:
        raise ValueError(f"--arch hybrid needs an attention layer; --attn-layers {text!r} has none")
    if arch in ("mamba1", "mamba2") and indices:
        raise ValueError(f"--arch {arch} and --attn-layers {text!r} disagree: attention layers make a hybrid: "
                         f"use --arch hybrid")
    return indices


def check_preset_attn_layers(preset: str, n_layer: int) -> None:
    """Without --attn-layers, the preset's attention layers must lie within --n-layer: a
    ValueError naming both flags otherwise (a hybrid preset cut shorter needs its own)."""
    outside = [i for i in PRESETS[preset].attn_layer_idx if i >= n_layer]
    if outside:
        raise ValueError(f"--n-layer {n_layer} leaves out the attention layers {outside} of the {preset} preset; "
                         f"give --attn-layers too (e.g. --attn-layers {n_layer - 1})")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                        dest_prefix: str = "", help: dict[str, str] | None = None,
                        defaults: object | None = None, default_note: str = "",
                        aliases: dict[str, str] | None = None) -> None:
    """One --flag per dataclass field, default None = unchanged; a bool field is a --name /
    --no-name pair. Each help says the default: the field's value in `defaults` (an instance,
    e.g. the default preset's config) when given, else the field's own default; `default_note`
    prefixes it ("from --preset; tiny: "). `help` gives fields a text before it; `aliases` a
    second, shown first, name of their flag ({"attn_layer_idx": "--attn-layers"})."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        flag = "--" + field.name.replace("_", "-")
        text = _help(field, defaults, default_note, (help or {}).get(field.name))
        if base is bool:
            parser.add_argument(flag, dest=dest_prefix + field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
            continue
        kind = base if base in (int, float) else str
        flags = [(aliases or {})[field.name], flag] if field.name in (aliases or {}) else [flag]
        parser.add_argument(*flags, dest=dest_prefix + field.name, type=kind, default=None,
                            metavar=base.__name__.upper() if hasattr(base, "__name__") else "VALUE", help=text)


def _help(field: dataclasses.Field, defaults: object | None, note: str, text: str | None) -> str | None:
    if defaults is not None:
        default = getattr(defaults, field.name)
    elif field.default is not dataclasses.MISSING:
        default = field.default
    else:
        return text
    shown = f"(default: {note}{default!r})"
    return f"{text} {shown}" if text else shown
