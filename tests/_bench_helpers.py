"""Load a ``bench/<name>.py`` script as a module in a test (bench/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    """The module of ``bench/<name>.py``; bench/ is on sys.path only while it loads, after the packages
    (bench/encoders.py must not shadow the ``encoders`` package)."""
    sys.path.append(str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
