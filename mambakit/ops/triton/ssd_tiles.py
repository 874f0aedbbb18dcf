"""The SSD kernels' launch settings: each kernel's tile edges, warps and pipeline stages.

One table, by d_state (the state's width N sets the register footprint of most tiles): the
settings for N <= 64, N <= 128 and wider. They were picked by `benchmarks/tuning/ssd_tiles.py`,
which times every kernel's candidates inside the whole forward and backward on the GPU. The
knob `ssd_tiles` (MAMBAKIT_SSD_TILES: a JSON object, or the path of a file holding one) overrides
entries for A/B runs and sweeps, in the table's own shape: {"kernel": {"setting": value}} for
every width, or {"kernel": {"64": {...}, "128": {...}}} by width.

The tile edges here are caps: a launch takes the smallest power of two covering the size it
tiles (at least 16, tl.dot's minimum), at most the cap."""

from __future__ import annotations

import functools
import json
import os

from .. import knobs

WIDTHS = (64, 128, 256)  # the table's columns: d_state <= 64, <= 128, anything wider

# kernel -> the settings it takes (every setting is an int)
SETTINGS = {
    "cb": ("block_t", "block_k", "num_warps", "num_stages"),
    "chunk_state": ("block_p", "block_n", "block_k", "num_warps", "num_stages"),
    "state_passing": ("block", "group", "num_warps"),
    "chunk_output": ("block_m", "block_p", "block_s", "block_k", "num_warps", "num_stages"),
    "chunk_state_bwd": ("block_p", "block_n", "block_k", "num_warps", "num_stages"),
    "state_passing_bwd": ("block", "group", "num_warps"),
    "dx": ("block_s", "block_t", "block_k", "num_warps", "num_stages"),
    "dcb": ("block_t", "block_s", "block_k", "num_warps", "num_stages", "min_programs"),
    "dbc": ("block", "block_n", "num_warps", "num_stages", "min_programs"),
}

# picked on an H100 (benchmarks/tuning/results/ssd_tiles_h100.json: 1 x 131072 at N = 64 and
# 2 x 8192 at N = 128, 32 heads of 64); states wider than 128 take the N = 128 column
_CHUNK_STATE = dict(block_p=64, block_n=128, block_k=32, num_warps=4, num_stages=3)
_OUTPUT = dict(block_m=64, block_p=64, block_s=32, block_k=64, num_warps=4, num_stages=3)

TABLE: dict[str, dict[int, dict[str, int]]] = {
    "cb": {64: dict(block_t=64, block_k=64, num_warps=4, num_stages=3),
           128: dict(block_t=64, block_k=64, num_warps=4, num_stages=2),
           256: dict(block_t=64, block_k=64, num_warps=4, num_stages=2)},
    "chunk_state": {w: dict(_CHUNK_STATE) for w in WIDTHS},
    "state_passing": {64: dict(block=1024, group=8, num_warps=4), 128: dict(block=1024, group=8, num_warps=8),
                      256: dict(block=1024, group=8, num_warps=8)},
    "chunk_output": {w: dict(_OUTPUT) for w in WIDTHS},
    "chunk_state_bwd": {64: dict(block_p=64, block_n=64, block_k=64, num_warps=4, num_stages=3),
                        128: dict(block_p=64, block_n=128, block_k=32, num_warps=4, num_stages=4),
                        256: dict(block_p=64, block_n=128, block_k=32, num_warps=4, num_stages=4)},
    "state_passing_bwd": {64: dict(block=1024, group=8, num_warps=8), 128: dict(block=512, group=4, num_warps=4),
                          256: dict(block=512, group=4, num_warps=4)},
    # the split backward's kernels, not yet swept on a GPU (64-step tiles, 4 warps, 2 stages).
    # min_programs: dcb and dbc sum a group's heads in one program while at least this many remain
    "dx": {w: dict(block_s=64, block_t=64, block_k=64, num_warps=4, num_stages=2) for w in WIDTHS},
    "dcb": {w: dict(block_t=64, block_s=64, block_k=64, num_warps=4, num_stages=2, min_programs=1024)
            for w in WIDTHS},
    "dbc": {w: dict(block=64, block_n=64, num_warps=4, num_stages=2, min_programs=1024) for w in WIDTHS},
}

_POWERS_OF_TWO = ("block_t", "block_k", "block_p", "block_n", "block_m", "block_s", "block", "group", "num_warps")


def tiles(kernel: str, d_state: int) -> dict[str, int]:
    """The settings of `kernel` for states of width d_state, with the knob's overrides applied."""
    width = next((w for w in WIDTHS if d_state <= w), WIDTHS[-1])
    return dict(TABLE[kernel][width], **_overrides(knobs.current().ssd_tiles).get(kernel, {}).get(width, {}))


@functools.lru_cache(maxsize=8)
def _overrides(text: str | None) -> dict[str, dict[int, dict[str, int]]]:
    """The knob's JSON (text, or the file it names) as {kernel: {width: {setting: value}}}, checked."""
    if text is None:
        return {}
    name = "MAMBAKIT_SSD_TILES"
    source = text
    if not text.lstrip().startswith("{"):
        if not os.path.isfile(text):
            raise ValueError(f"{name} must be a JSON object or the path of a JSON file; no file {text!r}")
        with open(text) as f:
            source = f.read()
    try:
        given = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{name} must be a JSON object of kernels, got {type(given).__name__}")
    out = {}
    for kernel, entry in given.items():
        if kernel not in SETTINGS:
            raise ValueError(f"{name}: unknown kernel {kernel!r}; the kernels are {list(SETTINGS)}")
        if not isinstance(entry, dict):
            raise ValueError(f"{name}: {kernel} must map to an object of settings")
        by_width = entry if entry and all(k.isdigit() for k in entry) else {str(w): entry for w in WIDTHS}
        out[kernel] = {}
        for width, settings in by_width.items():
            if int(width) not in WIDTHS:
                raise ValueError(f"{name}: {kernel} width {width} is not one of {WIDTHS}")
            out[kernel][int(width)] = _checked(name, kernel, settings)
    return out


def _checked(name: str, kernel: str, settings) -> dict[str, int]:
    if not isinstance(settings, dict):
        raise ValueError(f"{name}: {kernel}'s settings must be an object, got {settings!r}")
    for key, value in settings.items():
        if key not in SETTINGS[kernel]:
            raise ValueError(f"{name}: {kernel} has no setting {key!r}; it takes {SETTINGS[kernel]}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {kernel}.{key} must be a positive int, got {value!r}")
        if key in _POWERS_OF_TWO and value & (value - 1):
            raise ValueError(f"{name}: {kernel}.{key} must be a power of two, got {value}")
    return dict(settings)
