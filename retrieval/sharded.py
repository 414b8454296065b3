"""Search several index shards as one: each shard's top-k (threads), merged by score.

The merge is exact: the k best of the union are among the k best of each shard, so for exact
shards (``flat``) the result equals one index over the union, ids and scores. Shards must share
the embedding size and model id, and their ids must not overlap.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from retrieval.index import Index, IndexMismatchError, _as_matrix


def merge_topk(ids: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (Q, k_s) results -> the best ``k`` per query, best first (missing: id -1, score -inf)."""
    all_ids, all_scores = np.concatenate(ids, axis=1), np.concatenate(scores, axis=1)
    all_scores = np.where(all_ids >= 0, all_scores, -np.inf)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    out_ids = np.take_along_axis(all_ids, order, 1)
    out_scores = np.take_along_axis(all_scores, order, 1).astype(np.float32)
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    out_scores = np.where(out_ids >= 0, out_scores, -np.inf).astype(np.float32)
    return out_ids.astype(np.int64), out_scores


def _check_disjoint(shards: Sequence[Index], ranges: Sequence[Optional[tuple[int, int]]]) -> None:
    """IndexMismatchError naming an id two shards share. Shards whose id ranges do not overlap (the usual
    case) are not read; overlapping ones are compared on their sorted ids (``searchsorted``, no dict)."""
    for a in range(len(shards)):
        for b in range(a + 1, len(shards)):
            ra, rb = ranges[a], ranges[b]
            if ra is None or rb is None or ra[1] < rb[0] or rb[1] < ra[0]:
                continue
            ids_a, ids_b = shards[a]._items.sorted_ids(), shards[b]._items.sorted_ids()
            pos = np.clip(np.searchsorted(ids_a, ids_b), 0, len(ids_a) - 1)
            common = np.flatnonzero(ids_a[pos] == ids_b)
            if len(common):
                raise IndexMismatchError(f"id {int(ids_b[common[0]])} is in shard {a} and shard {b}; "
                                         f"shards of one collection need disjoint ids")


class ShardedIndex:
    """N :class:`Index` shards searched in parallel threads; ``search``/``metadata`` like one Index.

    Ids are looked up in the shards' own sorted id arrays (no table of every id): a lookup asks the
    shards whose (min, max) id range covers it."""

    def __init__(self, shards: Sequence[Index], threads: Optional[int] = None) -> None:
        shards = list(shards)
        if not shards:
            raise ValueError("ShardedIndex needs at least one shard")
        bad = [i for i, s in enumerate(shards) if not isinstance(s, Index)]
        if bad:
            raise TypeError(f"shards {bad} are not retrieval.Index objects")
        for attr in ("dim", "model_id"):
            values = {getattr(s, attr) for s in shards}
            if len(values) > 1:
                listing = ", ".join(f"shard {i}: {getattr(s, attr)!r}" for i, s in enumerate(shards))
                raise IndexMismatchError(f"the shards disagree in {attr} ({listing})")
        self.shards = shards
        self.dim, self.model_id = shards[0].dim, shards[0].model_id
        self._ranges = [s._items.id_range() for s in shards]  # (min, max) live id per shard, None: empty
        _check_disjoint(shards, self._ranges)
        self._pool = ThreadPoolExecutor(max_workers=threads or min(len(shards), os.cpu_count() or 1))

    @classmethod
    def load(cls, folders: Iterable[Union[str, os.PathLike]], model_id: Optional[str] = None,
             mmap: bool = False, threads: Optional[int] = None) -> "ShardedIndex":
        """Load saved index folders as shards (``mmap`` as in :meth:`Index.load`)."""
        return cls([Index.load(f, model_id=model_id, mmap=mmap) for f in folders], threads=threads)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def _owner(self, item_id: int) -> Optional[int]:
        """The shard holding ``item_id`` (None: none): only shards whose id range covers it are asked."""
        for number, (shard, span) in enumerate(zip(self.shards, self._ranges)):
            if span is not None and span[0] <= item_id <= span[1] and item_id in shard:
                return number
        return None

    def __contains__(self, item_id: int) -> bool:
        return self._owner(int(item_id)) is not None

    @property
    def kind(self) -> str:
        kinds = sorted({s.kind for s in self.shards})
        return kinds[0] if len(kinds) == 1 else "+".join(kinds)

    def metadata(self, item_id: int) -> dict:
        shard = self._owner(int(item_id))
        if shard is None:
            raise ValueError(f"id {item_id} is not in any shard")
        return self.shards[shard].metadata(item_id)

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over all shards: (Q, D) -> ids (Q, k) int64, scores (Q, k) float32, best first."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q = _as_matrix(queries, self.dim, name="queries")
        results = list(self._pool.map(lambda shard: shard.search(q, int(k)), self.shards))
        return merge_topk([r[0] for r in results], [r[1] for r in results], int(k))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"ShardedIndex(shards={len(self.shards)}, count={len(self)}, dim={self.dim}, model_id={self.model_id!r})"
