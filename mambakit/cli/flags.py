"""Flags made from dataclass fields: one --flag per field of a config, so that the command
line follows the config without a list kept by hand."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                        dest_prefix: str = "") -> None:
    """One --flag per dataclass field (bool fields take true/false), default None = unchanged."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            kind = parse_bool
        elif base in (int, float):
            kind = base
        else:
            kind = str
        parser.add_argument("--" + field.name.replace("_", "-"), dest=dest_prefix + field.name, type=kind,
                            default=None, metavar=base.__name__.upper() if hasattr(base, "__name__") else "VALUE",
                            help=f"(default: {field.default!r})" if field.default is not dataclasses.MISSING else None)


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
