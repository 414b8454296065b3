"""Load a ``bench/<name>.py`` script as a module in a test (bench/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    """The module of ``bench/<name>.py``; bench/ is on sys.path only while it loads, after the packages
    (bench/encoders.py must not shadow the ``encoders`` package). A script named like a package
    (bench/retrieval.py) is registered as ``bench_<name>``, never in the package's place."""
    found = importlib.util.find_spec(name)
    shadows = found is not None and Path(found.origin or "").parent != BENCH
    module_name = f"bench_{name}" if shadows else name
    sys.path.append(str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
