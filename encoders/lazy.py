"""Lazy public names for a package's ``__init__`` (PEP 562), so importing the package stays cheap; and
:func:`require`, the import of an optional dependency that names the extra to install when it is missing.

Standard library only: ``retrieval``, ``video`` (whose decode worker starts without torch) and ``ernie_vl`` use it.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"Index": "retrieval.index", ...})
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Callable, Mapping

PACKAGE = "ernie-vl"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message is one line with the ``pip install`` to run."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` saying ``pip install 'ernie-vl[extra]'``.

    ``purpose`` names what needs it (``"ernie-vl serve"``). Extras: ``serve`` (fastapi, uvicorn,
    python-multipart), ``plots`` (matplotlib), ``all`` (both)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise MissingExtraError(f"{purpose} needs {top}, which is not installed: "
                                f"pip install '{PACKAGE}[{extra}]'") from err


def lazy_exports(package: str, exports: Mapping[str, str],
                 extra: tuple[str, ...] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: a public name is imported from its module
    (``exports[name]``) on first use and cached in the package's namespace; an unknown name raises
    ``AttributeError`` naming the package. ``extra``: names defined eagerly, listed in ``__all__`` too."""
    table = dict(exports)
    public = sorted(table) + list(extra)

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return list(public)

    return __getattr__, __dir__, public
