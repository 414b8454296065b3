"""Image-text search: folder embedding, FAISS index on disk, search, Recall@K. Never imports ernie_vl.

Public names are resolved lazily so ``import retrieval`` does not load FAISS.
"""
from __future__ import annotations

from encoders.lazy import lazy_exports

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
    "ShardedIndex": "retrieval.sharded",
    "embed_to_parts": "retrieval.embed_parts",
    "PartsError": "retrieval.parts",
    "search_text": "retrieval.search",
    "search_image": "retrieval.search",
    "SearchHit": "retrieval.search",
    "write_gallery": "retrieval.gallery",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
