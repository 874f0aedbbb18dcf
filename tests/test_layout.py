"""The package's import contracts (pyproject.toml, `lint-imports`; docs/architecture.md): they
hold on the package, and each one breaks when a copy of the package is given the import it
forbids: an upward import, a kernel module imported from outside `mambakit.ops`, a cycle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mambakit

pytest.importorskip("importlinter")
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mambakit.__file__).parent


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts, over the package found in package_parent."""
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          env=env, capture_output=True, text=True, cwd=package_parent, timeout=300)


def test_the_contracts_hold():
    result = _lint(PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("ops/checks.py", "def _upward():\n    from ..models import lm\n    return lm\n",
     "mambakit.ops is not allowed to import mambakit.models"),
    ("modules/block.py", "from ..ops.triton import host\n", "Illegal imports of protected package mambakit.ops.triton"),
    ("ops/triton/helpers.py", "from . import scan_kernels\n", "No cycles are allowed in mambakit.ops.triton"),
], ids=["upward", "kernel-outside-ops", "cycle"])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, broken):
    copy = tmp_path / "mambakit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as f:
        f.write("\n\n" + line)
    result = _lint(tmp_path)
    assert result.returncode != 0 and broken in result.stdout, result.stdout + result.stderr
