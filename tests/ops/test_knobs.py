"""The tuning knobs: read from the environment once into one frozen value, changed within a
process only through `knobs.override`, which also forgets the launch plans made under the old
values; and no other module of the package reads a MAMBAKIT_* variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mambakit
from mambakit.ops import knobs


def test_environment_sets_the_knobs():
    got = knobs.Knobs.from_environ({"MAMBAKIT_SCAN_MIN_SEG": "64", "MAMBAKIT_SCAN_FWD_PREFETCH": "1",
                                    "MAMBAKIT_GLUON_SCAN": "0", "MAMBAKIT_SCAN_BWD_BLOCK_D": "8:4",
                                    "UNRELATED": "x"})
    assert got == knobs.Knobs(scan_min_seg=64, scan_fwd_prefetch=True, gluon_scan=False, scan_bwd_block_d="8:4")
    assert knobs.Knobs.from_environ({}) == knobs.Knobs()


@pytest.mark.parametrize("name,value", [("MAMBAKIT_SCAN_MIN_SEG", "x"), ("MAMBAKIT_SCAN_MIN_SEG", "0"),
                                        ("MAMBAKIT_GLUON_SCAN", "yes"), ("MAMBAKIT_SCAN_BWD_CHUNKS", "3"),
                                        ("MAMBAKIT_SCAN_BWD_BLOCK_D", "8:a")])
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ValueError, match=name):
        knobs.Knobs.from_environ({name: value})


def test_override_applies_within_the_block_and_restores():
    before = knobs.current()
    with knobs.override(scan_min_seg=16, reverse_words=False) as inside:
        assert knobs.current() is inside and inside.scan_min_seg == 16 and not inside.reverse_words
    assert knobs.current() is before
    with pytest.raises(TypeError):
        with knobs.override(no_such_knob=1):
            pass
    assert knobs.current() is before


def test_override_forgets_the_plans_made_under_the_old_values():
    pytest.importorskip("triton")
    from mambakit.ops.triton.scan_plan import plan_scan
    u, B, A = torch.empty(1, 4, 2048), torch.empty(1, 3, 2048), torch.empty(4, 3)
    assert plan_scan(u, B, A).forward.seg_len  # 4 rows: cut into segments by default
    with knobs.override(scan_seg_below=1):
        assert not plan_scan(u, B, A).forward.seg_len
    assert plan_scan(u, B, A).forward.seg_len


def test_only_the_knobs_module_reads_mambakit_variables():
    package = Path(mambakit.__file__).parent
    readers = [str(p.relative_to(package)) for p in package.rglob("*.py")
               if re.search(r"environ[^\n]*MAMBAKIT_|getenv\([^\n]*MAMBAKIT_", p.read_text())]
    assert readers == [], readers
    text = (package / "ops" / "knobs.py").read_text()
    for field in knobs.Knobs.__dataclass_fields__:  # every knob is documented in the module's table
        assert f"MAMBAKIT_{field.upper()}" in text and f"| {field}" in text, field
