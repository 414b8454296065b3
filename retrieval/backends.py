"""Vector stores behind :class:`retrieval.index.Index`: exact (torch matmul) and FAISS HNSW / IVF-PQ.

A store holds vectors in *slots* 0..n-1 (append-only); the Index maps slots to item ids.
Removed slots are either compacted away (flat) or masked at search time (hnsw, ivfpq).
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import torch

QUERY_CHUNK = 1024      # queries scored at once by the exact store
ROW_CHUNK = 32768       # at least this many stored vectors are scored at once
SCORE_BUDGET = 1 << 25  # floats in the (queries, rows) score buffer (128 MB)
NPROBE_FRACTION = 8     # default nprobe = nlist / NPROBE_FRACTION (at least NPROBE_MIN, at most nlist)
NPROBE_MIN = 16
RERANK_FACTOR = 20      # default shortlist of a re-ranked ivfpq search: RERANK_FACTOR * k


@dataclass
class IndexParams:
    """Tuning knobs of the approximate kinds (ignored by ``flat``); ``None`` = chosen from the data."""

    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 256  # recall@10 0.990 at 200k low-rank 512-d (128 gave 0.962; ~0.91 extrapolated
    #                            to 1M), see bench/results/retrieval.md
    ivf_nlist: Optional[int] = None
    ivf_nprobe: Optional[int] = None  # None: default_nprobe(nlist)
    pq_m: Optional[int] = None
    pq_nbits: int = 8
    rerank_factor: int = RERANK_FACTOR  # ivfpq with its vectors on disk: re-rank the PQ top (factor * k); 0 = off
    compact_dead_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "pq_nbits"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"IndexParams.{name} must be >= 1, got {value}")
        if int(self.rerank_factor) < 0:
            raise ValueError(f"IndexParams.rerank_factor must be >= 0 (0 = no re-ranking), got {self.rerank_factor}")
        if not 0.0 < self.compact_dead_fraction <= 1.0:
            raise ValueError(f"compact_dead_fraction must be in (0, 1], got {self.compact_dead_fraction}")

    def to_dict(self) -> dict:
        return asdict(self)


def _pad(scores: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (Q, k') results to (Q, k) with slot -1 and score -inf."""
    q, have = slots.shape
    if have == k:
        return slots, scores
    out_s = np.full((q, k), -np.inf, np.float32)
    out_i = np.full((q, k), -1, np.int64)
    out_s[:, :have], out_i[:, :have] = scores, slots
    return out_i, out_s


CHECK_BLOCK = 65536  # vectors per block when checking a loaded store


def _nonfinite_rows(read_block, total: int) -> np.ndarray:
    """Slots whose vector holds NaN or inf; ``read_block(start, n)`` -> (n, D) float32."""
    bad = [np.flatnonzero(~np.isfinite(read_block(start, min(CHECK_BLOCK, total - start))).all(axis=1)) + start
           for start in range(0, total, CHECK_BLOCK)]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


class FlatStore:
    """Exact inner-product search with chunked torch matmul + top-k over the vectors stored
    column-major: a (D, N) matrix, so a block of scores is ``queries @ columns``.

    That layout is MKL's fast one for few queries: with (N, D) rows, ``q @ x.T`` for a single query
    took ~10x longer here (a slow gemv path), and ~1.3x longer for batches of 100. Faster than FAISS
    ``IndexFlatIP`` on few threads (see bench/retrieval.py). Removal compacts.
    """

    kind = "flat"
    masks_removed = False  # removal compacts at once, every slot is alive

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim = dim
        self.columns = np.zeros((dim, 0), np.float32)  # (D, N), C-contiguous
        self._local = threading.local()

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32 view of the stored vectors (not C-contiguous)."""
        return self.columns.T

    @property
    def ntotal(self) -> int:
        return self.columns.shape[1]

    def add(self, x: np.ndarray) -> None:
        self.columns = np.ascontiguousarray(np.concatenate([self.columns, x.T], axis=1) if self.ntotal else x.T)

    def remove(self, slots: np.ndarray) -> None:
        keep = np.ones(self.ntotal, bool)
        keep[slots] = False
        self.compact(keep)

    def compact(self, keep: np.ndarray) -> None:
        self.columns = np.ascontiguousarray(self.columns[:, keep])

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.columns[:, slots].T)

    def _score_buffer(self, size: int) -> torch.Tensor:
        """A reused float32 buffer (per thread): fresh 100 MB allocations cost page faults every call."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.float32)
            self._local.buf = buf
        return buf

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, alive: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> slots (Q, k) int64, scores (Q, k) float32, best first.

        Scores are computed block by block into one reused (queries, rows) buffer of at most
        SCORE_BUDGET floats; each block's top-k is merged into the running best.
        """
        n = self.ntotal
        kk = min(k, n)
        q_all = torch.from_numpy(queries)
        cols = torch.from_numpy(self.columns)
        out_s = np.full((len(queries), kk), -np.inf, np.float32)
        out_i = np.full((len(queries), kk), -1, np.int64)
        if kk == 0:
            return _pad(out_s, out_i, k)
        for qs in range(0, len(queries), QUERY_CHUNK):
            q = q_all[qs:qs + QUERY_CHUNK]
            rows = min(n, max(ROW_CHUNK, SCORE_BUDGET // len(q)))
            buf = self._score_buffer(len(q) * rows)
            best_s = best_i = None
            for start in range(0, n, rows):
                block = cols[:, start:start + rows]                              # (D, rows)
                width = block.shape[1]
                scores = buf[: len(q) * width].view(len(q), width)
                torch.mm(q, block, out=scores)                                  # (q, rows)
                s, i = torch.topk(scores, min(kk, width), dim=1)
                if start:
                    i = i + start
                if best_s is not None:
                    s, order = torch.topk(torch.cat([best_s, s], 1), kk, dim=1)
                    i = torch.cat([best_i, i], 1).gather(1, order)
                best_s, best_i = s, i
            out_s[qs:qs + len(q)] = best_s.numpy()
            out_i[qs:qs + len(q)] = best_i.numpy()
        return _pad(out_s, out_i, k)

    def save(self, folder: Path) -> list[str]:
        np.save(folder / "vectors.npy", self.vectors)  # (N, D), written in Fortran order: no copy
        return ["vectors.npy"]

    def nonfinite_slots(self) -> np.ndarray:
        """Slots whose stored vector holds NaN or inf (checked after loading)."""
        return _nonfinite_rows(lambda start, n: self.columns[:, start:start + n].T, self.ntotal)

    def load(self, folder: Path, mmap: bool = False) -> None:
        # mmap: copy-on-write pages of the file; the Fortran-order (N, D) file is the (D, N) C-order matrix
        vectors = np.load(folder / "vectors.npy", allow_pickle=False, mmap_mode="c" if mmap else None)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.dtype != np.float32:
            raise ValueError(f"{folder / 'vectors.npy'} holds {vectors.dtype} {vectors.shape}, "
                             f"expected float32 (N, {self.dim})")
        self.columns = np.ascontiguousarray(vectors.T)  # free for the Fortran-order files we write


def read_faiss(path: Path, mmap: bool = False) -> faiss.Index:
    """``faiss.read_index``; with ``mmap`` the file is mapped read-only (``IO_FLAG_MMAP``), not read."""
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    return faiss.read_index(str(path), flags)


def _alive_selector(alive: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """An IDSelectorBitmap over slots (keep the returned bit array referenced while searching)."""
    bits = np.packbits(alive.astype(np.uint8), bitorder="little")
    return faiss.IDSelectorBitmap(len(alive), faiss.swig_ptr(bits)), bits


class HNSWStore:
    """FAISS ``IndexHNSWFlat`` (inner product); removed slots are skipped with an ID selector."""

    kind = "hnsw"
    masks_removed = True

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim, self.params = dim, params
        self.index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = params.hnsw_ef_construction
        self.index.hnsw.efSearch = params.hnsw_ef_search

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, x: np.ndarray) -> None:
        self.index.add(x)

    def remove(self, slots: np.ndarray) -> None:
        pass  # masked at search time; Index.compact rebuilds when many are dead

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return np.stack([self.index.reconstruct(int(s)) for s in slots]) if len(slots) else np.zeros((0, self.dim), np.float32)

    def compact(self, keep: np.ndarray) -> None:
        kept = self.index.reconstruct_n(0, self.ntotal)[keep] if self.ntotal else np.zeros((0, self.dim), np.float32)
        self.__init__(self.dim, self.params)
        if len(kept):
            self.add(np.ascontiguousarray(kept))

    def search(self, queries: np.ndarray, k: int, alive: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        if self.ntotal == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.params.hnsw_ef_search, k)
        keepalive = None
        if alive is not None:
            params.sel, keepalive = _alive_selector(alive)
        scores, slots = self.index.search(queries, k, params=params)
        del keepalive
        return slots.astype(np.int64), scores.astype(np.float32)

    def save(self, folder: Path) -> list[str]:
        faiss.write_index(self.index, str(folder / "index.faiss"))
        return ["index.faiss"]

    def nonfinite_slots(self) -> np.ndarray:
        """Slots whose stored vector holds NaN or inf (checked after loading)."""
        return _nonfinite_rows(lambda start, n: self.index.reconstruct_n(start, n), self.ntotal)

    def load(self, folder: Path, mmap: bool = False) -> None:
        index = read_faiss(folder / "index.faiss", mmap)
        if not isinstance(index, faiss.IndexHNSWFlat) or index.d != self.dim:
            raise ValueError(f"{folder / 'index.faiss'} is not an HNSW index of dimension {self.dim}")
        index.hnsw.efSearch = self.params.hnsw_ef_search
        self.index = index


def default_pq_m(dim: int, target: int = 64) -> int:
    """The largest divisor of ``dim`` that is <= min(target, dim) (PQ needs m | dim)."""
    for m in range(min(target, dim), 0, -1):
        if dim % m == 0:
            return m
    return 1


def default_nprobe(nlist: int) -> int:
    """Inverted lists visited per query when ``IndexParams.ivf_nprobe`` is None: nlist / NPROBE_FRACTION,
    at least NPROBE_MIN (bench/retrieval.py --scale sweeps it: see bench/results/retrieval_scale*.md)."""
    return int(min(nlist, max(NPROBE_MIN, nlist // NPROBE_FRACTION)))


def default_nlist(n: int) -> int:
    """About 2 sqrt(N) inverted lists (quick to train on few cores), with >= 39 training points per list."""
    return int(max(1, min(2 * math.sqrt(max(n, 1)), n // 39, 65536)))


class IVFPQStore:
    """FAISS ``IndexIVFPQ`` (inner product): compressed codes, trained on the first vectors added.

    The slot is the FAISS id; removal is native (``remove_ids``).
    """

    kind = "ivfpq"
    masks_removed = False

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim, self.params = dim, params
        self.index: Optional[faiss.Index] = None
        self._next_slot = 0

    @property
    def ntotal(self) -> int:
        return self._next_slot

    def _train(self, x: np.ndarray) -> None:
        nlist = self.params.ivf_nlist or default_nlist(len(x))
        m = self.params.pq_m or default_pq_m(self.dim)
        if self.dim % m:
            raise ValueError(f"pq_m={m} must divide the embedding size {self.dim}")
        need = max(nlist, 2 ** self.params.pq_nbits)
        if len(x) < need:
            raise ValueError(
                f"ivfpq needs at least {need} vectors to train (nlist={nlist}, pq_nbits={self.params.pq_nbits}), "
                f"got {len(x)}; use kind='flat' for small collections or lower ivf_nlist / pq_nbits")
        index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{m}x{self.params.pq_nbits}", faiss.METRIC_INNER_PRODUCT)
        faiss.downcast_index(index).do_polysemous_training = False  # the factory's object keeps ownership  # slow, and only for polysemous search
        rng = np.random.default_rng(0)
        sample = x if len(x) <= 256 * nlist else x[rng.choice(len(x), 256 * nlist, replace=False)]
        index.train(np.ascontiguousarray(sample))
        self.index = index

    def train(self, sample: np.ndarray) -> None:
        """Train the coarse quantizer and PQ codebooks on (n, D) float32 before any add."""
        if self.index is not None:
            raise ValueError("this ivfpq store is already trained")
        self._train(sample)

    def add(self, x: np.ndarray) -> None:
        if self.index is None:
            self._train(x)
        slots = np.arange(self._next_slot, self._next_slot + len(x), dtype=np.int64)
        self.index.add_with_ids(x, slots)
        self._next_slot += len(x)

    def remove(self, slots: np.ndarray) -> None:
        if self.index is not None and len(slots):
            self.index.remove_ids(faiss.IDSelectorBatch(len(slots), faiss.swig_ptr(np.ascontiguousarray(slots, np.int64))))

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        raise ValueError("ivfpq keeps only compressed codes; the original vectors cannot be recovered")

    def nonfinite_slots(self) -> np.ndarray:
        """All slots when the trained codebooks (coarse centroids, PQ centroids) hold NaN or inf: the codes
        themselves are integers, so that is where a damaged ivfpq index shows."""
        if self.index is None:
            return np.zeros(0, np.int64)
        ivf = faiss.extract_index_ivf(self.index)
        coarse = ivf.quantizer.reconstruct_n(0, ivf.quantizer.ntotal)
        pq = faiss.vector_to_array(faiss.downcast_index(self.index).pq.centroids)
        if np.isfinite(coarse).all() and np.isfinite(pq).all():
            return np.zeros(0, np.int64)
        return np.arange(self.ntotal, dtype=np.int64)

    def compact(self, keep: np.ndarray) -> None:
        pass  # ids stay sparse; removed codes are already gone

    @property
    def nlist(self) -> int:
        return int(faiss.extract_index_ivf(self.index).nlist) if self.index is not None else 0

    def nprobe(self, override: Optional[int] = None) -> int:
        """The nprobe a search uses: ``override``, else ``params.ivf_nprobe``, else default_nprobe(nlist)."""
        value = override if override is not None else self.params.ivf_nprobe
        return int(value) if value is not None else default_nprobe(self.nlist)

    def search(self, queries: np.ndarray, k: int, alive: Optional[np.ndarray] = None,
               nprobe: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None or self.index.ntotal == 0:
            return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64), k)
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe(nprobe)
        scores, slots = self.index.search(queries, k, params=params)
        scores = np.where(slots < 0, -np.inf, scores).astype(np.float32)
        return slots.astype(np.int64), scores

    def save(self, folder: Path) -> list[str]:
        if self.index is None:
            return []
        faiss.write_index(self.index, str(folder / "index.faiss"))
        return ["index.faiss"]

    def load(self, folder: Path, slots: int = 0, mmap: bool = False) -> None:
        path = folder / "index.faiss"
        self._next_slot = slots
        if not path.exists():
            self.index = None
            return
        index = read_faiss(path, mmap)
        if index.d != self.dim:
            raise ValueError(f"{path} has dimension {index.d}, expected {self.dim}")
        self.index = index


STORES = {"flat": FlatStore, "hnsw": HNSWStore, "ivfpq": IVFPQStore}
