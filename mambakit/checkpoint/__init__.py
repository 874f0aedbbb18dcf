"""Checkpoints on disk: the three formats (formats.py), atomic file and directory writes (files.py), and
where a checkpoint lives (hub.py: a local directory or the local Hugging Face cache, never a
download). This package knows no model class: `load_pretrained(cls, ...)` is given one."""

from .files import atomic_write, atomic_write_json, write_directory
from .formats import FORMATS, load_pretrained, load_state_dict_strict, read_config, read_state_dict, save_pretrained
from .hub import resolve_directory

__all__ = ["FORMATS", "atomic_write", "atomic_write_json", "load_pretrained", "load_state_dict_strict",
           "read_config", "read_state_dict", "resolve_directory", "save_pretrained", "write_directory"]
