"""Image-text search: folder embedding, FAISS index on disk, search, Recall@K. Never imports ernie_vl.

Public names are resolved lazily so ``import retrieval`` does not load FAISS.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "load_image": "retrieval.images",
    "ImageLoadError": "retrieval.images",
    "ImageTextCSV": "retrieval.datasets",
    "ImageFolderFiles": "retrieval.datasets",
    "collate_skip_none": "retrieval.datasets",
    "recall_at_k": "retrieval.metrics",
    "embed_images": "retrieval.embed",
    "embed_texts": "retrieval.embed",
    "EmbedResult": "retrieval.embed",
    "Index": "retrieval.index",
    "IndexMismatchError": "retrieval.index",
    "search_text": "retrieval.search",
    "search_image": "retrieval.search",
    "SearchHit": "retrieval.search",
    "write_gallery": "retrieval.gallery",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
