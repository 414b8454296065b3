"""ERNIE-VL: image and video encoders feeding a shared mixture-of-experts backbone.

Public names are resolved lazily (PEP 562) so that ``import ernie_vl`` stays
cheap and the CLI starts fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ErnieVL": "ernie_vl.model",
    "ErnieVLOutput": "ernie_vl.model",
    "ErnieVLConfig": "ernie_vl.config",
    "list_models": "ernie_vl.presets",
    "create_model": "ernie_vl.presets",
    "load_config": "ernie_vl.presets",
    "get_tokenizer": "encoders.text",
    "from_open_clip": "ernie_vl.from_open_clip",
    "quantize_int8": "ernie_vl.quantize",
    "MoEFeedForward": "ernie_vl.moe",
    "SharedBackbone": "ernie_vl.backbone",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ernie_vl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
