"""The tree passes pyflakes-level lint: ruff's F rules (undefined names, unused imports and variables,
f-strings without placeholders), the rule set ``[tool.ruff.lint]`` in pyproject.toml selects."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                                reason="ruff is not installed (pip install -e '.[dev]')")


def _ruff_f(target: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache",
                           "--output-format", "concise", str(target)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_the_tree_has_no_pyflakes_findings():
    done = _ruff_f(ROOT, ROOT)
    assert done.returncode == 0, f"ruff check --select F found:\n{done.stdout}{done.stderr}"


def test_the_check_reports_an_undefined_name(tmp_path):
    """The same command fails on a file with an undefined name and an unused import (so the test above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text('import os\n\n\ndef f() -> "Tensor":\n    return undefined_name\n')
    done = _ruff_f(bad, tmp_path)
    assert done.returncode == 1
    for code in ("F401", "F821"):
        assert code in done.stdout, done.stdout
