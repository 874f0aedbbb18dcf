"""Every tuning knob of mambakit's kernels, read in one place with one lifetime.

The knobs are read from the environment once, when this module is first imported, into one
frozen `Knobs`. Nothing else in the package reads a `MAMBAKIT_*` variable. Within a process
they change only through `override(...)`, a context manager that also forgets every cached
launch plan made under the old values (tests and tuning sweeps use it). The defaults are the
measured best on the H200 (BENCHMARKS.md); the knobs exist for A/B runs and sweeps.

| variable                     | field              | default | what it changes                                      |
|------------------------------|--------------------|---------|------------------------------------------------------|
| MAMBAKIT_SCAN_SAVE_EVERY     | scan_save_every    | auto    | steps between the states the scan saves for backward |
| MAMBAKIT_SCAN_BWD_CHUNKS     | scan_bwd_chunks    | auto    | chunks the backward takes back per saved state (1/2) |
| MAMBAKIT_SCAN_BWD_BLOCK_D    | scan_bwd_block_d   | auto    | backward channels per program: "C" or "MANY:FEW"     |
| MAMBAKIT_SCAN_FWD_PREFETCH   | scan_fwd_prefetch  | auto    | forward loads a chunk ahead into registers (0/1)     |
| MAMBAKIT_SCAN_SEG_BELOW      | scan_seg_below     | 8192    | rows (sequence x channel) below which L is segmented |
| MAMBAKIT_SCAN_SEG_ROWS       | scan_seg_rows      | 65536   | rows a segmented scan aims at                        |
| MAMBAKIT_SCAN_MIN_SEG        | scan_min_seg       | 512     | the shortest segment                                 |
| MAMBAKIT_REVERSE_WORDS       | reverse_words      | 1       | Vision's reversed scan loads B/C as bf16 pairs (0/1) |
| MAMBAKIT_GLUON_SCAN          | gluon_scan         | 1       | Vision's padded path scans with the Gluon kernel     |
| MAMBAKIT_COMPILE_GLUE        | compile_glue       | 0       | torch.compile the bidirectional layer's glue ops     |
| MAMBAKIT_SSD_TILES           | ssd_tiles          | none    | SSD kernels' tiles, warps, stages: JSON or its file  |
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Iterator

_PREFIX = "MAMBAKIT_"


@dataclass(frozen=True)
class Knobs:
    scan_save_every: int | None = None  # None: 8 steps for bf16 inputs, 16 otherwise
    scan_bwd_chunks: int | None = None  # None: chunks of 8 steps, i.e. 1 (bf16) or 2 per saved state
    scan_bwd_block_d: str | None = None  # None: the measured default; "C" or "C_MANY:C_FEW"
    scan_fwd_prefetch: bool | None = None  # None: on between 8192 and 16384 rows
    scan_seg_below: int = 8192
    scan_seg_rows: int = 65536
    scan_min_seg: int = 512
    reverse_words: bool = True
    gluon_scan: bool = True
    compile_glue: bool = False
    ssd_tiles: str | None = None  # None: ops/triton/ssd_tiles.py's table; else a JSON object (or its file) overriding it

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, name = getattr(self, f.name), _PREFIX + f.name.upper()
            if value is None:
                continue
            if f.name in _JSON:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be JSON text or the path of a JSON file, got {value!r}")
            elif f.name in _TEXT:
                parts = value.split(":") if isinstance(value, str) else []
                if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
                    raise ValueError(f"{name} must be 'C' or 'C_MANY:C_FEW' (positive ints), got {value!r}")
            elif f.name in _FLAGS:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.scan_bwd_chunks not in (None, 1, 2):
            raise ValueError(f"{_PREFIX}SCAN_BWD_CHUNKS must be 1 or 2, got {self.scan_bwd_chunks}")

    @classmethod
    def from_environ(cls, environ=os.environ) -> "Knobs":
        """The knobs that the `MAMBAKIT_*` variables set; unset ones keep their defaults."""
        values = {}
        for f in dataclasses.fields(cls):
            name = _PREFIX + f.name.upper()
            if name in environ:
                values[f.name] = _parse(name, f.name, environ[name])
        return cls(**values)


def _parse(name: str, field: str, text: str):
    """One variable's text as its field's type."""
    text = text.strip()
    if field in _TEXT or field in _JSON:
        return text
    if field in _FLAGS:
        if text not in ("0", "1"):
            raise ValueError(f"{name} must be 0 or 1, got {text!r}")
        return text == "1"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


_FLAGS = frozenset({"scan_fwd_prefetch", "reverse_words", "gluon_scan", "compile_glue"})
_TEXT = frozenset({"scan_bwd_block_d"})
_JSON = frozenset({"ssd_tiles"})  # checked where it is read (ssd_tiles.py), with the kernels' names
_active = Knobs.from_environ()
_on_change: list[Callable[[], None]] = []


def current() -> Knobs:
    """The knobs in force."""
    return _active


def on_change(forget: Callable[[], None]) -> Callable[[], None]:
    """Registers a cache's `clear`, called whenever `override` changes the knobs (a launch plan
    made under the old values must not be reused). Returns `forget`, so it can decorate."""
    _on_change.append(forget)
    return forget


@contextlib.contextmanager
def override(**changes) -> Iterator[Knobs]:
    """Within the block, the knobs with `changes` applied (field names of `Knobs`); every
    registered cache is cleared on entry and on exit."""
    global _active
    before = _active
    _active = dataclasses.replace(before, **changes)
    _clear()
    try:
        yield _active
    finally:
        _active = before
        _clear()


def _clear() -> None:
    for forget in _on_change:
        forget()
