"""Build an :class:`~retrieval.index.Index` from an ``EMB/`` parts folder without re-embedding.

IVF-PQ is sized from N, the embedding size and a memory budget (autofaiss's rule of thumb:
about ``4 sqrt(N)`` inverted lists, a power of two; the widest PQ code that fits the budget),
trained on a random sample read from the memory-mapped parts, then filled part by part:
the full vectors are never all in memory. ``flat`` and ``hnsw`` keep every vector and are
refused when they do not fit the budget.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np

from retrieval.backends import IndexParams
from retrieval.index import AUTO_APPROX_THRESHOLD, Index, resolve_kind
from retrieval.parts import PartsError, check_parts, finished_parts, iter_part_chunks, read_manifest
from retrieval.rerank import PartsVectors

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
PQ_M_CHOICES = (64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 6, 4, 3, 2, 1)
ID_BYTES = 8              # FAISS stores an int64 id beside each code in the inverted lists
ITEM_OVERHEAD = 48        # our per-item bookkeeping: slot id, id lookup (sorted ids + order), row offset, copies
CHUNK_ROWS = 16384        # rows read from the parts at once


def parse_memory(budget: Union[str, int, float]) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GB"``, ``"800MiB"`` or a byte count -> bytes; ValueError otherwise."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = int(budget)
    else:
        m = _SIZE.match(str(budget))
        if m is None:
            raise ValueError(f"memory budget {budget!r} is not a size like '4G', '512M' or a byte count")
        value = int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))
    if value <= 0:
        raise ValueError(f"memory budget must be positive, got {budget!r}")
    return value


@dataclass
class IVFPQPlan:
    """What :func:`plan_ivfpq` chose and what it expects the index to take."""

    nlist: int
    pq_m: int
    train_size: int
    estimated_bytes: int

    def to_dict(self) -> dict:
        return {"nlist": self.nlist, "pq_m": self.pq_m, "train_size": self.train_size,
                "estimated_bytes": self.estimated_bytes}


def plan_ivfpq(n: int, dim: int, budget: int, meta_bytes_per_item: int = 64) -> IVFPQPlan:
    """nlist ~ 4 sqrt(N) (a power of two, >= 39 training points per list), the largest PQ m (<= 64, dividing
    ``dim``, sub-vectors of >= 4 dims) whose codes, ids and bookkeeping fit ``budget`` beside the training
    sample and centroids."""
    if n < 1:
        raise ValueError(f"cannot plan an index of {n} vectors")
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    train_budget = budget // 4                        # the training sample takes at most a quarter
    row = dim * 4
    # FAISS wants >= 39 training points per list, and those points must fit the training share
    while nlist > 1 and (39 * nlist > n or 39 * nlist * row > train_budget):
        nlist //= 2
    nlist = int(min(nlist, 65536))
    train_size = int(min(n, max(256, 39 * nlist, min(64 * nlist, train_budget // row))))
    # peak = the larger of the training phase (the sample and FAISS's working copies of it) and the adding
    # phase (a chunk as float32 with FAISS's residuals, the codes and ids in growing lists, our bookkeeping)
    train_phase = int(2.5 * train_size * row) + nlist * row
    chunk_bytes = 4 * CHUNK_ROWS * row
    per_item = ITEM_OVERHEAD + meta_bytes_per_item
    for m in PQ_M_CHOICES:
        if dim % m or m > max(1, dim // 4):       # sub-vectors of >= 4 dimensions
            continue
        need = max(train_phase, nlist * row + chunk_bytes + n * (2 * (m + ID_BYTES) + per_item))
        if need <= budget:
            return IVFPQPlan(nlist, m, train_size, need)
    smallest = max(train_phase, nlist * row + chunk_bytes + n * (2 * (1 + ID_BYTES) + per_item))
    raise ValueError(f"{n} vectors of size {dim} do not fit a memory budget of {budget / 2**20:.0f} MiB even with "
                     f"1-byte PQ codes (about {smallest / 2**20:.0f} MiB needed); raise memory_budget")


def _sample_rows(parts: dict, size: int, seed: int = 0) -> np.ndarray:
    """``size`` rows drawn uniformly from all parts, read from the memory-mapped files part by part."""
    counts = np.array([parts[k].count for k in sorted(parts)], np.int64)
    total = int(counts.sum())
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for j, number in enumerate(sorted(parts)):
        local = pick[(pick >= offsets[j]) & (pick < offsets[j + 1])] - offsets[j]
        if len(local):
            out.append(np.asarray(parts[number].vectors(mmap=True)[local], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(out))


def build_from_parts(folder: Union[str, Path], kind: str = "ivfpq", memory_budget: Union[str, int] = "4G",
                     params: Optional[IndexParams] = None, model_id: Optional[str] = None,
                     info: Optional[dict] = None) -> Index:
    """An index over every finished part of ``folder``; PartsError when parts are missing or disagree.

    ``model_id`` (when given) must match the parts'. ``kind``: ``ivfpq`` (chunked, within
    ``memory_budget``), ``flat``, ``hnsw`` or ``auto`` (flat below 200k items when it fits, else ivfpq).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    parts = finished_parts(folder)
    dim, parts_model = check_parts(folder, parts, manifest["parts"] if manifest else None)
    if manifest is not None and (manifest.get("dim"), manifest.get("model_id")) != (dim, parts_model):
        raise PartsError(f"{folder}: the manifest says dim {manifest.get('dim')} / model {manifest.get('model_id')!r}, "
                         f"the parts hold dim {dim} / model {parts_model!r}")
    if model_id is not None and parts_model != model_id:
        raise PartsError(f"{folder} was embedded by model {parts_model!r}, not {model_id!r}")
    n = sum(p.count for p in parts.values())
    budget = parse_memory(memory_budget)
    # auto: exact below AUTO_APPROX_THRESHOLD items when it fits the budget, else IVF-PQ (HNSW keeps every vector)
    kind = ("flat" if n < AUTO_APPROX_THRESHOLD and n * dim * 8 <= budget else "ivfpq") if kind == "auto" \
        else resolve_kind(kind, n)
    params = params or IndexParams()
    index_info = {**((manifest or {}).get("info") or {}), **(info or {}), "built_from": str(folder.resolve())}
    if kind == "ivfpq":
        first = next(p for _, p in sorted(parts.items()) if p.count)
        meta_bytes = int(first.metadata_path.stat().st_size / max(first.count, 1))  # rows are kept as JSON bytes
        plan = plan_ivfpq(n, dim, budget, meta_bytes)
        params = replace(params, ivf_nlist=params.ivf_nlist or plan.nlist, pq_m=params.pq_m or plan.pq_m)
        index = Index(dim, "ivfpq", model_id=parts_model, params=params,
                      info={**index_info, "ivfpq_plan": plan.to_dict(), "memory_budget": budget})
        index._store.train(_sample_rows(parts, plan.train_size))
        for x, rows in iter_part_chunks(parts, CHUNK_ROWS):
            ids, metas = _split_rows(rows)
            index.add(x, metadata=metas, ids=ids)
        # the parts stay on disk: searches re-rank the PQ shortlist with their float rows (slot order = part order)
        index.vector_source = PartsVectors(folder.resolve(), [(parts[k].name, parts[k].count) for k in sorted(parts)])
        return index
    need = n * dim * 4 * 2
    if need > budget:
        raise ValueError(f"a {kind} index keeps every vector: {n} x {dim} float32 needs about {need / 2**20:.0f} MiB "
                         f"to build, over the budget of {budget / 2**20:.0f} MiB; use kind='ivfpq' or raise the budget")
    index = Index(dim, kind, model_id=parts_model, params=params, info=index_info)
    if kind == "hnsw":
        for x, rows in iter_part_chunks(parts, CHUNK_ROWS):
            ids, metas = _split_rows(rows)
            index.add(x, metadata=metas, ids=ids)
        return index
    vectors = np.empty((n, dim), np.float32)  # one allocation, filled part by part (no repeated concatenation)
    metas, ids, at = [], [], 0
    for x, rows in iter_part_chunks(parts, CHUNK_ROWS):
        vectors[at:at + len(x)] = x
        at += len(x)
        chunk_ids, chunk_metas = _split_rows(rows)
        metas.extend(chunk_metas)
        ids.extend(chunk_ids)
    index.add(vectors, metadata=metas, ids=ids)
    return index


def _split_rows(rows: list[dict]) -> tuple[list[int], list[dict]]:
    """(ids, metadata without ``id``); the rows are changed in place (a copy per item would double them)."""
    return [row.pop("id") for row in rows], rows
