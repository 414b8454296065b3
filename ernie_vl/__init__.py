"""ERNIE-VL: image and video encoders feeding a shared mixture-of-experts backbone.

Public names are resolved lazily (PEP 562) so that ``import ernie_vl`` stays
cheap and the CLI starts fast.
"""
from __future__ import annotations

from encoders.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ErnieVL": "ernie_vl.model",
    "ErnieVLOutput": "ernie_vl.model",
    "ErnieVLConfig": "ernie_vl.config",
    "list_models": "ernie_vl.presets",
    "create_model": "ernie_vl.presets",
    "load_config": "ernie_vl.presets",
    "get_tokenizer": "ernie_vl.tokenizer",
    "from_open_clip": "ernie_vl.from_open_clip",
    "quantize_int8": "ernie_vl.quantize",
    "MoEFeedForward": "ernie_vl.moe",
    "SharedBackbone": "ernie_vl.backbone",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, extra=("__version__",))
