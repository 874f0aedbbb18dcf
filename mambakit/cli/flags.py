"""Flags made from dataclass fields: one --flag per field of a config, so that the command
line follows the config without a list kept by hand. Every boolean option of the command line
is a --name / --no-name pair (argparse.BooleanOptionalAction)."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                        dest_prefix: str = "", help: dict[str, str] | None = None,
                        defaults: object | None = None, default_note: str = "") -> None:
    """One --flag per dataclass field, default None = unchanged; a bool field is a --name /
    --no-name pair. Each help says the default: the field's value in `defaults` (an instance,
    e.g. the default preset's config) when given, else the field's own default; `default_note`
    prefixes it ("from --preset; tiny: "). `help` gives fields a text before it."""
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
        parser.add_argument(flag, dest=dest_prefix + field.name, type=kind, default=None,
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
