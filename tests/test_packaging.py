"""What a user's pip and tools see of the package: the licence, the metadata, the typing marker,
and that plotting leaves the caller's matplotlib backend alone."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_licence_file_is_shipped_and_matches_the_declared_licence():
    project = _project()
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text


def test_metadata_has_urls_classifiers_and_the_typing_marker():
    project = _project()
    assert {"Homepage", "Issues", "Changelog"} <= set(project["urls"])
    assert "Typing :: Typed" in project["classifiers"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639
    assert (ROOT / "mambakit" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["mambakit"]


def test_the_minimum_torch_is_one_that_has_the_apis_we_use():
    """FSDP2's public `fully_shard` (training/distributed.py) needs torch >= 2.6; the floor
    declared is the oldest torch the suite has run on."""
    (torch_req,) = [d for d in _project()["dependencies"] if d.startswith("torch")]
    major, minor = map(int, re.search(r">=\s*(\d+)\.(\d+)", torch_req).groups())
    assert (major, minor) >= (2, 6)


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from mambakit.tasks.digits import plot_confusion
    from mambakit.tasks.induction_heads import plot_lengths
    from mambakit.tasks.synthetic import plot_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # the caller's choice (a notebook would pick its inline backend)
    try:
        plot_curves([{"step": 1, "loss": 1.0, "acc": 0.5}, {"step": 2, "loss": 0.5, "acc": 0.7}],
                    "acc", "t", tmp_path / "a.png")
        plot_confusion([[1, 0], [0, 1]], 1.0, tmp_path / "b.png")
        plot_lengths([{"length": 4, "accuracy": 1.0}], tmp_path / "c.png", 4, "t")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
