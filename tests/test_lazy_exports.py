"""encoders.lazy: the one PEP 562 lazy-export pattern of the packages' __init__ files."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from encoders.lazy import lazy_exports


def test_names_resolve_on_first_use_and_are_cached(monkeypatch):
    pkg = types.ModuleType("fakepkg")
    monkeypatch.setitem(sys.modules, "fakepkg", pkg)
    pkg.__getattr__, pkg.__dir__, pkg.__all__ = lazy_exports("fakepkg", {"sqrt": "math", "dedent": "textwrap"},
                                                             extra=("VERSION",))
    import math

    assert pkg.__all__ == ["dedent", "sqrt", "VERSION"]
    assert "sqrt" not in vars(pkg)
    assert pkg.sqrt is math.sqrt
    assert vars(pkg)["sqrt"] is math.sqrt  # cached: __getattr__ is not called again
    with pytest.raises(AttributeError, match="module 'fakepkg' has no attribute 'nope'"):
        pkg.nope


@pytest.mark.parametrize("package", ["encoders", "retrieval", "video", "ernie_vl"])
def test_every_public_name_of_each_package_resolves(package):
    mod = __import__(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        getattr(mod, "no_such_name")


def test_importing_the_packages_loads_no_torch():
    code = "import sys, encoders, retrieval, video, ernie_vl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
