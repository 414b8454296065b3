"""A searchable embedding index with item ids and JSON metadata, saved atomically with a manifest.

Kinds: ``flat`` (exact inner product, torch matmul + top-k), ``hnsw`` (FAISS graph) and
``ivfpq`` (FAISS compressed codes); ``auto`` picks ``flat`` below ``AUTO_APPROX_THRESHOLD``
items and ``hnsw`` above. Store L2-normalised vectors so the inner product is the cosine.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from retrieval.backends import STORES, IndexParams
from retrieval.items import IndexMismatchError, ItemTable
from retrieval.rerank import PartsVectors, VectorSourceError
from retrieval.rerank import rerank as _rerank

FORMAT_NAME = "ernie-vl-index"
FORMAT_VERSION = 1
KINDS = ("flat", "hnsw", "ivfpq")
AUTO_APPROX_THRESHOLD = 200_000
MANIFEST = "manifest.json"

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


def resolve_kind(kind: str, count: int) -> str:
    """``auto`` -> ``flat`` below AUTO_APPROX_THRESHOLD items, else ``hnsw``; other kinds are checked."""
    if kind == "auto":
        return "hnsw" if count >= AUTO_APPROX_THRESHOLD else "flat"
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds are {('auto',) + KINDS}")
    return kind


def _as_matrix(x: ArrayLike, dim: Optional[int], name: str = "embeddings") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1 and dim is not None and arr.shape[0] == dim:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} have width {arr.shape[1]} but the index holds {dim}-d vectors")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return np.ascontiguousarray(arr)


def _nonfinite_error(where: Union[Path, str], bad: np.ndarray, slot_ids: np.ndarray) -> IndexMismatchError:
    return IndexMismatchError(f"index {where} is damaged: {len(bad)} vectors hold NaN or inf "
                              f"(ids {np.asarray(slot_ids[bad[:10]]).tolist()}); rebuild it")


def _check_json(meta: Any, position: int) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"metadata[{position}] must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata[{position}] is not JSON-serialisable: {err}") from err
    return meta


class Index:
    """Embeddings (N, D) with stable int64 ids and per-item JSON metadata.

    ``search(queries (Q, D), k) -> (ids (Q, k) int64, scores (Q, k) float32)``, best first;
    missing results (k > len) are id -1, score -inf.
    """

    def __init__(self, dim: int, kind: str = "flat", model_id: Optional[str] = None,
                 params: Optional[IndexParams] = None, info: Optional[dict] = None) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; valid kinds are {KINDS} (or 'auto' in Index.build)")
        self.dim, self.kind, self.model_id = int(dim), kind, model_id
        self.params = params or IndexParams()
        self.info: dict = dict(info or {})
        self._store = STORES[kind](self.dim, self.params)
        self._items = ItemTable()                       # slot -> id (-1 when removed) and metadata rows
        self._next_id = 0
        self.read_only = False                          # True when loaded with mmap=True
        self.vector_source: Optional[PartsVectors] = None  # ivfpq built from parts: the float vectors on disk
        self._mapped_vectors: Optional[Path] = None     # a mapped flat index: its vectors.npy, checked by searches
        self._full_check_pending = False                # ... in full at the first search (saved without the record)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, embeddings: ArrayLike, metadata: Optional[Sequence[Optional[dict]]] = None,
              kind: str = "auto", ids: Optional[Sequence[int]] = None, model_id: Optional[str] = None,
              params: Optional[IndexParams] = None, info: Optional[dict] = None) -> "Index":
        """A new index over ``embeddings`` (N, D); ``kind='auto'`` chooses by N."""
        x = _as_matrix(embeddings, None)
        index = cls(x.shape[1], resolve_kind(kind, len(x)), model_id=model_id, params=params, info=info)
        index.add(x, metadata=metadata, ids=ids)
        return index

    @classmethod
    def build_from_parts(cls, folder: Union[str, os.PathLike], kind: str = "ivfpq",
                         memory_budget: Union[str, int] = "4G", **kwargs: Any) -> "Index":
        """An index over an ``EMB/`` parts folder (``ernie-vl embed``), read part by part; see
        :func:`retrieval.index_parts.build_from_parts`."""
        from retrieval.index_parts import build_from_parts

        return build_from_parts(folder, kind=kind, memory_budget=memory_budget, **kwargs)

    def add(self, embeddings: ArrayLike, metadata: Optional[Sequence[Optional[dict]]] = None,
            ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """Append (N, D) vectors; returns their ids (given ``ids`` or the next free ones)."""
        self._check_writable("add to")
        x = _as_matrix(embeddings, self.dim)
        n = len(x)
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"got {len(metadata)} metadata entries for {n} embeddings")
        metas = [_check_json(m, i) for i, m in enumerate(metadata)] if metadata is not None else [{} for _ in range(n)]
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if len(new_ids) != n:
                raise ValueError(f"got {len(new_ids)} ids for {n} embeddings")
            if (new_ids < 0).any():
                raise ValueError(f"ids must be >= 0, got {int(new_ids.min())}")
            if len(np.unique(new_ids)) != n:
                raise ValueError("ids contain duplicates")
            taken = new_ids[self._items.slots_of(new_ids) >= 0]
            if len(taken):
                raise ValueError(f"ids already in the index: {taken[:10].tolist()}")
        if n == 0:
            return new_ids
        if self.vector_source is not None:
            warnings.warn("items added outside build_from_parts have no float vectors on disk: this index no longer "
                          "re-ranks its searches (rebuild it from the parts to re-rank again)", stacklevel=2)
            self.vector_source = None
        self._store.add(x)
        self._items.append(new_ids, metas)
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def remove(self, ids: Iterable[int], missing_ok: bool = False) -> int:
        """Remove items by id; returns how many were removed. Unknown ids raise unless ``missing_ok``."""
        self._check_writable("remove from")
        ids = np.asarray(list(ids), dtype=np.int64).reshape(-1)
        found = self._items.slots_of(ids)
        if (found < 0).any() and not missing_ok:
            raise ValueError(f"ids not in the index: {ids[found < 0][:10].tolist()}")
        slots = np.unique(found[found >= 0])
        if len(slots) == 0:
            return 0
        self._store.remove(slots)
        self._items.kill(slots)
        keep = self._items.alive_mask()
        dead_fraction = 1.0 - self._items.alive / max(len(self._slot_ids), 1)
        if keep is not None and (self.kind == "flat" or (self.kind == "hnsw" and
                                                         dead_fraction >= self.params.compact_dead_fraction)):
            self._compact(keep)
        return len(slots)

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ValueError(f"cannot {what} an index opened with mmap=True (read-only); load it with mmap=False")

    def _compact(self, keep: np.ndarray) -> None:
        if self.kind != "flat":
            self._store.compact(keep)
        self._items.compact(keep)

    def convert(self, kind: str) -> "Index":
        """A copy of this index as another kind (from ``flat`` or ``hnsw``: they keep full vectors)."""
        kind = resolve_kind(kind, len(self))
        keep = self._items.alive_mask()
        alive = np.arange(len(self._slot_ids)) if keep is None else np.flatnonzero(keep)
        vectors = self._store.reconstruct(alive)
        out = Index(self.dim, kind, model_id=self.model_id, params=self.params, info=self.info)
        out.add(vectors, metadata=[self._items.row(int(s)) for s in alive], ids=self._items.slot_ids[alive])
        out._next_id = max(out._next_id, self._next_id)
        return out

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._items.alive

    def __contains__(self, item_id: int) -> bool:
        return bool(self._items.slots_of(np.array([int(item_id)]))[0] >= 0)

    @property
    def _slot_ids(self) -> np.ndarray:
        return self._items.slot_ids

    @property
    def ids(self) -> np.ndarray:
        """The ids of the items, in insertion order."""
        keep = self._items.alive_mask()
        return np.array(self._slot_ids) if keep is None else self._slot_ids[keep]

    def metadata(self, item_id: int) -> dict:
        """The metadata dict of one item (ValueError for an unknown id), decoded from its stored row."""
        slot = int(self._items.slots_of(np.array([int(item_id)]))[0])
        if slot < 0:
            raise ValueError(f"id {item_id} is not in the index")
        return self._items.row(slot)

    def items(self) -> Iterable[tuple[int, dict]]:
        """``(id, metadata)`` of every item in insertion order."""
        return self._items.items()

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored (len(ids), D) vectors (flat and hnsw; ivfpq keeps only codes)."""
        slots = self._items.slots_of(np.asarray(list(ids), np.int64))
        if (slots < 0).any():
            raise ValueError(f"ids not in the index: {[int(i) for i, s in zip(ids, slots) if s < 0][:10]}")
        return self._store.reconstruct(slots)

    def attach_vectors(self, folder: Union[str, os.PathLike, None]) -> None:
        """Point an ivfpq index built from parts at its ``EMB/`` folder (after moving it), or detach with None.

        The parts' names and row counts must be the ones the index was built from (VectorSourceError)."""
        if folder is None:
            self.vector_source = None
            return
        if self.kind != "ivfpq":
            raise ValueError(f"only ivfpq indexes re-rank from vectors on disk; this index is {self.kind!r}")
        if self.vector_source is None:
            raise ValueError("this index was not built from parts (Index.build_from_parts): no part list to attach")
        source = PartsVectors(folder, self.vector_source.parts)
        if source.count != len(self._slot_ids):
            raise VectorSourceError(f"the parts hold {source.count} rows, the index has {len(self._slot_ids)} slots")
        source.open(self.dim)
        self.vector_source = source

    def search(self, queries: ArrayLike, k: int = 10, rerank: Optional[int] = None,
               nprobe: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: (Q, D) -> ids (Q, k) int64, scores (Q, k) float32.

        ivfpq only: ``nprobe`` inverted lists are visited (default ``params.ivf_nprobe``, else
        nlist/16); ``rerank=k'`` re-scores the PQ top-``k'`` exactly against the float vectors on
        disk (an index built from parts keeps them), ``0`` returns PQ scores. The default re-ranks
        ``params.rerank_factor * k`` when the vectors are there.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q = _as_matrix(queries, self.dim, name="queries")
        short = self._shortlist(int(k), rerank, nprobe)
        if self._full_check_pending:
            self._check_mapped_vectors()
        alive = self._items.alive_mask() if self._store.masks_removed else None  # None: no slot removed
        extra = {"nprobe": nprobe} if self.kind == "ivfpq" else {}
        slots, scores = self._store.search(q, max(int(k), short), alive=alive, **extra)
        if self._mapped_vectors is not None and not np.isfinite(scores[slots >= 0]).all():
            self._check_mapped_vectors()
        if short:
            try:
                self.vector_source.open(self.dim)
            except VectorSourceError as err:
                if rerank is not None:
                    raise
                warnings.warn(f"{err}; searching with PQ scores only", stacklevel=2)
                slots, scores, short = slots[:, :k], scores[:, :k], 0
        if short:
            slots, scores = _rerank(q, slots, self.vector_source, int(k))
        ids = np.where(slots >= 0, self._slot_ids[np.clip(slots, 0, None)] if len(self._slot_ids) else -1, -1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return ids.astype(np.int64), scores

    def _check_mapped_vectors(self) -> None:
        """Every vector of a mapped flat index, block by block (IndexMismatchError naming the file).

        Such an open reads no vectors. An index saved with the write-time record (manifest ``vectors``) is
        checked through each search's own scores: a NaN vector scores NaN for every query and NaN ranks
        first, an inf one scores +-inf or NaN (first, or last where it changes no result); a non-finite
        score sends the search here. One saved without the record comes here at its first search (which
        reads every vector anyway) and keeps coming until it passes."""
        bad = self._store.nonfinite_slots()
        if len(bad):
            raise _nonfinite_error(self._mapped_vectors, bad, self._slot_ids)
        self._full_check_pending = False

    def _shortlist(self, k: int, rerank: Optional[int], nprobe: Optional[int]) -> int:
        """The PQ shortlist to re-rank (0: none), checking ``rerank`` and ``nprobe``."""
        if nprobe is not None and (self.kind != "ivfpq" or not isinstance(nprobe, (int, np.integer)) or nprobe < 1):
            raise ValueError(f"nprobe must be a positive int and applies to ivfpq indexes only "
                             f"(got {nprobe!r} for a {self.kind!r} index)")
        if rerank is None:
            return self.params.rerank_factor * k if self.kind == "ivfpq" and self.vector_source is not None else 0
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
            raise ValueError(f"rerank must be an int >= k (the shortlist size) or 0 for none, got {rerank!r}")
        if rerank == 0:
            return 0
        if rerank < k:
            raise ValueError(f"rerank={rerank} is the shortlist to re-score and must be >= k={k} (or 0 for none)")
        if self.kind != "ivfpq":
            return 0  # flat and hnsw already score with the full vectors
        if self.vector_source is None:
            raise ValueError("rerank needs the float vectors: build the index with Index.build_from_parts (its EMB/ "
                             "folder is kept) or attach_vectors(EMB/) after moving it")
        return int(rerank)

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": self.kind,
            "embedding_dim": self.dim, "count": len(self), "slots": int(len(self._slot_ids)),
            "next_id": self._next_id, "model_id": self.model_id, "params": self.params.to_dict(),
            "info": self.info, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "vector_source": self.vector_source.to_dict() if self.vector_source is not None else None,
            "ids": self._items.summary(),  # checked now: a memory-mapped open trusts it and reads no ids
            "vectors": self._vector_record(),
        }

    def _vector_record(self) -> dict:
        """The write-time check of the stored vectors: how many hold NaN or inf (a mapped flat open given 0
        reads none of them; any other count, or none recorded, is checked in full at the first search)."""
        return {"nonfinite": int(len(self._store.nonfinite_slots()))}

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """Write to a temporary sibling folder, then rename it into place (a crash leaves the old index)."""
        target = Path(folder).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = self._store.save(tmp)
            files += self._items.save(tmp)
            manifest = self.manifest()
            manifest["files"] = {name: (tmp / name).stat().st_size for name in files}
            with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
            for name in list(manifest["files"]) + [MANIFEST]:
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            old = None
            if target.exists():
                if not (target / MANIFEST).exists() and any(target.iterdir()):
                    raise ValueError(f"{target} exists and is not an index folder; refusing to replace it")
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @staticmethod
    def read_manifest(folder: Union[str, os.PathLike]) -> dict:
        """The manifest of a saved index (IndexMismatchError when absent or not ours)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            backups = sorted(folder.parent.glob(f".{folder.name}.old-*"))
            hint = f"; an earlier version survives at {backups[-1]}" if backups else ""
            raise IndexMismatchError(f"{folder} is not an index folder (no {MANIFEST}){hint}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise IndexMismatchError(f"{path} is not valid JSON: {err}") from err
        if manifest.get("format") != FORMAT_NAME:
            raise IndexMismatchError(f"{path} is not an {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexMismatchError(f"{folder} has index format version {manifest.get('format_version')}, "
                                     f"this code reads version {FORMAT_VERSION}; rebuild the index")
        return manifest

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], model_id: Optional[str] = None,
             embedding_dim: Optional[int] = None, mmap: bool = False) -> "Index":
        """Load a saved index, checking format version, model id and embedding size when given, and the count.

        ``mmap=True`` maps the vector file instead of reading it (FAISS ``IO_FLAG_MMAP``; flat: a
        copy-on-write ``np.memmap``): the OS pages it in as searches touch it. Such an index is read-only.
        """
        folder = Path(folder)
        m = cls.read_manifest(folder)
        if model_id is not None and m.get("model_id") != model_id:
            raise IndexMismatchError(f"index {folder} was built with model {m.get('model_id')!r}, "
                                     f"not {model_id!r}; re-index with this model or load the matching one")
        if embedding_dim is not None and m["embedding_dim"] != embedding_dim:
            raise IndexMismatchError(f"index {folder} holds {m['embedding_dim']}-d embeddings, "
                                     f"the model makes {embedding_dim}-d ones")
        for name, size in m.get("files", {}).items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                raise IndexMismatchError(f"index file {path} is missing or truncated (expected {size} bytes)")
        known = {f.name for f in fields(IndexParams)}
        params = IndexParams(**{k: v for k, v in m.get("params", {}).items() if k in known})
        index = cls(m["embedding_dim"], m["kind"], model_id=m.get("model_id"), params=params, info=m.get("info"))
        items = ItemTable.open(folder, mmap=mmap, summary=m.get("ids"))
        slot_ids = items.slot_ids
        if index.kind == "ivfpq":
            index._store.load(folder, slots=len(slot_ids), mmap=mmap)
        else:
            index._store.load(folder, mmap=mmap)
        index.read_only = bool(mmap)
        if not (len(slot_ids) == items.rows == m["slots"]) or items.alive != m["count"]:
            raise IndexMismatchError(f"index {folder} is inconsistent: manifest says {m['count']} items in "
                                     f"{m['slots']} slots, files hold {items.alive} ids in {len(slot_ids)} slots "
                                     f"and {items.rows} metadata rows")
        if index.kind != "ivfpq" and index._store.ntotal != len(slot_ids):
            raise IndexMismatchError(f"index {folder}: the vector store holds {index._store.ntotal} vectors, "
                                     f"expected {len(slot_ids)}")
        items.check(folder, int(m["next_id"]))
        if mmap and index.kind == "flat":  # nothing read now: the searches check (see _check_mapped_vectors)
            index._mapped_vectors = folder / "vectors.npy"
            index._full_check_pending = (m.get("vectors") or {}).get("nonfinite") != 0
        else:
            bad = index._store.nonfinite_slots()
            if len(bad):
                raise _nonfinite_error(folder, bad, slot_ids)
        index._items = items
        index._next_id = int(m["next_id"])
        if m.get("vector_source"):
            source = PartsVectors.from_dict(m["vector_source"])
            if index.kind != "ivfpq" or source.count != len(slot_ids):
                raise IndexMismatchError(f"index {folder}: its vector source covers {source.count} rows, the "
                                         f"{index.kind} index has {len(slot_ids)} slots")
            index.vector_source = source                  # the parts are opened at the first re-ranked search
        return index

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, count={len(self)}, dim={self.dim}, model_id={self.model_id!r})"
