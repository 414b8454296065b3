"""Text -> image and image -> image search over an :class:`~retrieval.index.Index`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from retrieval.embed import embed_texts, encode_image_batch, resolve_preprocess
from retrieval.images import PathLike, load_image, to_rgb
from retrieval.index import Index, IndexMismatchError


@dataclass
class SearchHit:
    """One result: item ``id``, inner-product ``score``, 0-based ``rank`` and the item's ``metadata``."""

    id: int
    score: float
    rank: int
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def hits_from_arrays(index: Index, ids: np.ndarray, scores: np.ndarray) -> list[list[SearchHit]]:
    """(Q, k) id / score arrays -> one list of hits per query (padding ids of -1 dropped)."""
    out = []
    for row_ids, row_scores in zip(ids, scores):
        out.append([SearchHit(int(i), float(s), r, index.metadata(int(i)))
                    for r, (i, s) in enumerate(zip(row_ids, row_scores)) if i >= 0])
    return out


def check_model_matches(model: Any, index: Index, model_id: Optional[str] = None) -> None:
    """IndexMismatchError when the index records a model id and the model's differs."""
    mid = model_id or getattr(model, "model_id", None)
    if mid and index.model_id and mid != index.model_id:
        raise IndexMismatchError(f"the index was built with model {index.model_id!r} but the query model "
                                 f"is {mid!r}; their embeddings are not comparable")


def search_text(model: Any, index: Index, query: Union[str, Sequence[str]], k: int = 10,
                tokenizer: Optional[Callable] = None, model_id: Optional[str] = None,
                rerank: Optional[int] = None,
                nprobe: Optional[int] = None) -> Union[list[SearchHit], list[list[SearchHit]]]:
    """Top-``k`` items for a sentence (-> list of hits) or a list of sentences (-> one list each);
    ``rerank`` / ``nprobe`` as in :meth:`Index.search` (ivfpq)."""
    single = isinstance(query, str)
    queries = [query] if single else list(query)
    empty = [q for q in queries if not isinstance(q, str) or not q.strip()]
    if empty:
        raise ValueError(f"queries must be non-empty strings, got {empty[0]!r}")
    check_model_matches(model, index, model_id)
    emb = embed_texts(model, queries, tokenizer=tokenizer)
    hits = hits_from_arrays(index, *index.search(emb, k, rerank=rerank, nprobe=nprobe))
    return hits[0] if single else hits


ImageQuery = Union[PathLike, Image.Image]


def search_image(model: Any, index: Index, image: Union[ImageQuery, Sequence[ImageQuery]], k: int = 10,
                 preprocess: Optional[Callable] = None, model_id: Optional[str] = None,
                 rerank: Optional[int] = None,
                 nprobe: Optional[int] = None) -> Union[list[SearchHit], list[list[SearchHit]]]:
    """Top-``k`` items for an example image (path or PIL image), or one list per image of a list;
    ``rerank`` / ``nprobe`` as in :meth:`Index.search` (ivfpq)."""
    single = not isinstance(image, (list, tuple))
    images = [image] if single else list(image)
    check_model_matches(model, index, model_id)
    transform = resolve_preprocess(model, preprocess)
    pils = [to_rgb(im) if isinstance(im, Image.Image) else load_image(im) for im in images]
    batch = torch.stack([transform(p) for p in pils])
    emb = encode_image_batch(model, batch).numpy()
    hits = hits_from_arrays(index, *index.search(emb, k, rerank=rerank, nprobe=nprobe))
    return hits[0] if single else hits
