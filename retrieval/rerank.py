"""Exact re-ranking of a compressed index's shortlist against the float vectors kept on disk.

An IVF-PQ index scores with compressed codes, so its order among close neighbours is rough. An
index built from an ``EMB/`` parts folder keeps a :class:`PartsVectors` source: the part files in
slot order. ``search(k, rerank=k')`` takes the PQ top-``k'`` and re-scores those rows exactly with
rows read from the memory-mapped ``.npy`` parts (never all loaded): only ``k'`` rows per query are
touched, a bounded block of queries at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

GATHER_BUDGET = 1 << 24   # float32 values of gathered shortlist rows held at once (64 MB)


class VectorSourceError(ValueError):
    """The float vectors behind an index cannot be read (folder moved, parts changed)."""


class PartsVectors:
    """Rows ``0..n-1`` of an index's slots = the rows of ``parts`` (names, counts) in order, read from
    ``folder/<name>.npy`` memory-mapped on first use."""

    def __init__(self, folder: str | Path, parts: Sequence[tuple[str, int]]) -> None:
        self.folder = Path(folder)
        self.parts = [(str(name), int(count)) for name, count in parts]
        counts = np.array([c for _, c in self.parts], np.int64)
        if (counts < 0).any():
            raise ValueError(f"part counts must be >= 0, got {counts.tolist()}")
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: Optional[list[np.ndarray]] = None
        self.dim: Optional[int] = None

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "parts": [[n, c] for n, c in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> "PartsVectors":
        try:
            return cls(d["folder"], [(n, c) for n, c in d["parts"]])
        except (KeyError, TypeError, ValueError) as err:
            raise VectorSourceError(f"the index's vector source {d!r} is not readable ({err})") from err

    def open(self, dim: int) -> None:
        """Map every part file; VectorSourceError naming the first one that is missing or changed."""
        if self._maps is not None:
            return
        maps = []
        for name, count in self.parts:
            path = self.folder / f"{name}.npy"
            if count == 0:
                maps.append(np.zeros((0, dim), np.float32))
                continue
            try:
                x = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise VectorSourceError(f"cannot read the index's float vectors from {path} ({err}); the EMB/ folder "
                                        f"was moved or deleted: point the index at it with attach_vectors(folder), "
                                        f"or search with rerank=0") from err
            if x.ndim != 2 or x.shape != (count, dim) or x.dtype not in (np.float16, np.float32):
                raise VectorSourceError(f"{path} holds {x.dtype} {x.shape}, the index expects float16/float32 "
                                        f"({count}, {dim}): the parts changed since the index was built")
            maps.append(x)
        self._maps, self.dim = maps, dim

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """(n,) slots in ``[0, count)`` -> (n, D) float32, read part by part in ascending order."""
        assert self._maps is not None, "open() first"
        slots = np.asarray(slots, np.int64)
        out = np.empty((len(slots), self.dim), np.float32)
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        which = np.searchsorted(self.offsets, sorted_slots, side="right") - 1
        for p in np.unique(which):
            sel = which == p
            out[order[sel]] = self._maps[p][sorted_slots[sel] - self.offsets[p]]
        return out


def rerank(queries: np.ndarray, slots: np.ndarray, source: PartsVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each query's shortlist: queries (Q, D), slots (Q, k') with -1 for none ->
    slots (Q, k) int64, scores (Q, k) float32, best first (missing: -1, -inf). Slots outside the
    source are an error. Queries are processed in blocks so at most GATHER_BUDGET floats are gathered."""
    q_count, short = slots.shape
    out_s = np.full((q_count, k), -np.inf, np.float32)
    out_i = np.full((q_count, k), -1, np.int64)
    if short == 0 or q_count == 0:
        return out_i, out_s
    valid = slots >= 0
    if (slots[valid] >= source.count).any():
        raise VectorSourceError(f"the shortlist holds slots up to {int(slots.max())} but the vectors on disk cover "
                                f"{source.count}: items were added after the build")
    dim = queries.shape[1]
    block = max(1, GATHER_BUDGET // max(1, short * dim))
    take = min(k, short)
    for start in range(0, q_count, block):
        s = slots[start:start + block]
        v = valid[start:start + block]
        uniq, inverse = np.unique(s[v], return_inverse=True)
        rows = source.rows(uniq)                                         # (u, D) float32
        scores = np.full(s.shape, -np.inf, np.float32)
        per_query = np.repeat(np.arange(len(s)), v.sum(axis=1))
        scores[v] = np.einsum("nd,nd->n", rows[inverse], queries[start:start + block][per_query])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :take]
        top_s = np.take_along_axis(scores, order, 1)
        top_i = np.where(np.isfinite(top_s), np.take_along_axis(s, order, 1), -1)
        out_s[start:start + len(s), :take] = top_s
        out_i[start:start + len(s), :take] = top_i
    return out_i, out_s
