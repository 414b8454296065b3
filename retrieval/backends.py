"""Vector stores behind :class:`retrieval.index.Index`: exact (torch matmul) and FAISS HNSW / IVF-PQ.

A store holds vectors in *slots* 0..n-1 (append-only); the Index maps slots to item ids.
Removed slots are either compacted away (flat) or masked at search time (hnsw, ivfpq).
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import torch

from retrieval import exact

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
    flat_first_stage: str = "auto"  # flat: "auto" (bf16 + fp32 rescoring where the CPU has fast bf16), "bf16", "fp32"

    def __post_init__(self) -> None:
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "pq_nbits"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"IndexParams.{name} must be >= 1, got {value}")
        if int(self.rerank_factor) < 0:
            raise ValueError(f"IndexParams.rerank_factor must be >= 0 (0 = no re-ranking), got {self.rerank_factor}")
        if self.flat_first_stage not in exact.FIRST_STAGES:
            raise ValueError(f"IndexParams.flat_first_stage must be one of {exact.FIRST_STAGES}, "
                             f"got {self.flat_first_stage!r}")
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


FILE_CHECK_BYTES = 8 << 20  # bytes per read when checking the vectors of a mapped HNSW file


def _nonfinite_rows(read_block, total: int, block: int = CHECK_BLOCK) -> np.ndarray:
    """Slots whose vector holds NaN or inf; ``read_block(start, n)`` -> (n, D) float32."""
    bad = [np.flatnonzero(~np.isfinite(read_block(start, min(block, total - start))).all(axis=1)) + start
           for start in range(0, total, block)]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def _file_tail_nonfinite(path: Path, index: faiss.Index) -> Optional[np.ndarray]:
    """Slots whose vector holds NaN or inf, read from the file of a mapped ``IndexHNSWFlat`` with ``pread``
    (so the check maps no page of it into this process), or None when the file does not end as FAISS writes
    one: the flat storage last, a uint64 element count then the ``ntotal x d`` float32 rows. The first and
    last rows are compared with the index's own to make sure the bytes read are its vectors."""
    n, d = int(index.ntotal), int(index.d)
    row = d * 4
    with open(path, "rb") as f:
        offset = os.fstat(f.fileno()).st_size - n * row
        if n == 0 or offset < 8:
            return None
        if int.from_bytes(os.pread(f.fileno(), 8, offset - 8), "little") not in (n * d, n * row):
            return None

        def read_block(start: int, count: int) -> np.ndarray:
            raw = os.pread(f.fileno(), count * row, offset + start * row)
            return np.frombuffer(raw, dtype=np.float32).reshape(count, d)

        for slot in {0, n - 1}:
            if read_block(slot, 1)[0].tobytes() != np.asarray(index.reconstruct(slot), np.float32).tobytes():
                return None
        return _nonfinite_rows(read_block, n, max(1, FILE_CHECK_BYTES // row))


class FlatStore:
    """Exact inner-product search: chunked torch matmul + top-k, in one or two stages.

    The vectors are kept as an (N, D) float32 array ``x`` in the layout the search wants:
    Fortran order for the fp32 path (its transpose is the (D, N) column matrix, MKL's fast layout for
    ``queries @ columns``), C order for the two-stage path (:mod:`retrieval.exact`: a bf16 (D, N) copy
    finds the candidates, the fp32 rows rescore them; the result is still the fp32 top-k). Which one
    runs is :func:`retrieval.exact.choose_first_stage` (``IndexParams.flat_first_stage``), decided once
    the index holds ``exact.MIN_ITEMS`` vectors; a memory-mapped index always searches in fp32.
    Removal compacts.
    """

    kind = "flat"
    masks_removed = False  # removal compacts at once, every slot is alive

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim, self.params = dim, params
        self.x = np.zeros((0, dim), np.float32, order="F")
        self.mapped = False
        self._stage: Optional[exact.FirstStage] = None
        self._two: Optional[exact.TwoStage] = None
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32 view of the stored vectors (Fortran or C order)."""
        return self.x

    @property
    def ntotal(self) -> int:
        return self.x.shape[0]

    @property
    def first_stage(self) -> exact.FirstStage:
        """The product that finds candidates here (decided when first asked, then kept)."""
        if self.mapped:
            return exact.FirstStage("fp32", "memory-mapped index: searched in place in fp32")
        if self._stage is None:
            self._stage = exact.choose_first_stage(self.params.flat_first_stage)
        return self._stage

    def _two_stage(self, n: Optional[int] = None) -> bool:
        """Whether ``n`` vectors (default: those held) are searched in two stages."""
        return (self.ntotal if n is None else n) >= exact.MIN_ITEMS and self.first_stage.name == "bf16"

    def _set(self, x: np.ndarray, copy: bool = False) -> None:
        """Keep ``x`` (a copy when asked) in the layout the search wants; drops the two-stage copy."""
        order = "C" if self._two_stage(len(x)) else "F"
        with self._lock:
            self._two = None
            self.x = np.array(x, order=order) if copy else np.asarray(x, order=order)

    def add(self, x: np.ndarray) -> None:
        self._set(np.concatenate([self.x, x], axis=0) if self.ntotal else x)

    def remove(self, slots: np.ndarray) -> None:
        keep = np.ones(self.ntotal, bool)
        keep[slots] = False
        self.compact(keep)

    def compact(self, keep: np.ndarray) -> None:
        self._set(self.x[keep])

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.x[slots])

    def _score_buffer(self, size: int) -> torch.Tensor:
        """A reused float32 buffer (per thread): fresh 100 MB allocations cost page faults every call."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=torch.float32)
            self._local.buf = buf
        return buf

    def _stages(self) -> exact.TwoStage:
        with self._lock:
            if self._two is None:
                self._two = exact.TwoStage(torch.from_numpy(self.x), exact.rounding_norms(self.x))
            return self._two

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int, alive: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> slots (Q, k) int64, scores (Q, k) float32, best first."""
        n = self.ntotal
        kk = min(k, n)
        out_s = np.full((len(queries), kk), -np.inf, np.float32)
        out_i = np.full((len(queries), kk), -1, np.int64)
        if kk == 0:
            return _pad(out_s, out_i, k)
        q_all = torch.from_numpy(queries)
        two = self._stages() if self._two_stage() and exact.use_two_stage(n, kk, len(queries)) else None
        step = QUERY_CHUNK if two is None else max(1, min(QUERY_CHUNK, 2 * SCORE_BUDGET // n))
        for qs in range(0, len(queries), step):
            q = q_all[qs:qs + step]
            if two is not None and exact.use_two_stage(n, kk, len(q)):
                s, i = two.search(q, kk, self._fp32_topk)
            else:
                s, i = exact.best_first(*self._fp32_topk(q, kk), kk)
            out_s[qs:qs + len(q)] = s.numpy()
            out_i[qs:qs + len(q)] = i.numpy()
        return _pad(out_s, out_i, k)

    def _fp32_topk(self, q: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, D) -> fp32 top-``kk`` scores and slots over all stored vectors, block by block into one
        reused (queries, rows) buffer of at most SCORE_BUDGET floats; each block's top-k is merged."""
        n = self.ntotal
        cols = torch.from_numpy(self.x.T)                                      # (D, N), a view either way
        rows = min(n, max(ROW_CHUNK, SCORE_BUDGET // len(q)))
        buf = self._score_buffer(len(q) * rows)
        best_s = best_i = None
        for start in range(0, n, rows):
            block = cols[:, start:start + rows]                                # (D, rows)
            width = block.shape[1]
            scores = buf[: len(q) * width].view(len(q), width)
            torch.mm(q, block, out=scores)                                     # (q, rows)
            s, i = torch.topk(scores, min(kk, width), dim=1)
            if start:
                i = i + start
            if best_s is not None:
                s, order = torch.topk(torch.cat([best_s, s], 1), kk, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, order)
            best_s, best_i = s, i
        return best_s, best_i

    def save(self, folder: Path) -> list[str]:
        path = folder / "vectors.npy"
        if self.x.flags.f_contiguous:
            np.save(path, self.x)  # (N, D) in Fortran order: no copy
        else:  # the file is always Fortran order (a memory-mapped load searches its columns in place)
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=self.x.shape, fortran_order=True)
            for start in range(0, self.ntotal, CHECK_BLOCK):
                out[start:start + CHECK_BLOCK] = self.x[start:start + CHECK_BLOCK]
            out.flush()
            del out
        return ["vectors.npy"]

    def nonfinite_slots(self) -> np.ndarray:
        """Slots whose stored vector holds NaN or inf (checked after loading)."""
        return _nonfinite_rows(lambda start, n: self.x[start:start + n], self.ntotal)

    def load(self, folder: Path, mmap: bool = False) -> None:
        # mmap: copy-on-write pages of the file, searched in place; else read into the layout the search wants
        vectors = np.load(folder / "vectors.npy", allow_pickle=False, mmap_mode="c" if mmap else "r")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.dtype != np.float32:
            raise ValueError(f"{folder / 'vectors.npy'} holds {vectors.dtype} {vectors.shape}, "
                             f"expected float32 (N, {self.dim})")
        self.mapped = bool(mmap)
        if mmap:
            self.x, self._two = vectors, None
        else:
            self._set(vectors, copy=True)


def read_faiss(path: Path, mmap: bool = False, flat_codes: bool = False) -> faiss.Index:
    """``faiss.read_index``; with ``mmap`` the file is mapped read-only, not read: ``flat_codes`` maps a flat
    storage's vectors and an HNSW graph (``IO_FLAG_MMAP_IFC``, FAISS >= 1.10), otherwise the inverted lists
    (``IO_FLAG_MMAP``)."""
    mapping = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) if flat_codes else faiss.IO_FLAG_MMAP
    flags = (mapping | faiss.IO_FLAG_READ_ONLY) if mmap else 0
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
        self.mapped_file: Optional[Path] = None  # the file a memory-mapped index reads its vectors from

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
        """Slots whose stored vector holds NaN or inf (checked after loading). A mapped index reads its file
        in blocks instead of its mapping, so the check leaves the vectors out of this process's memory."""
        if self.mapped_file is not None:
            bad = _file_tail_nonfinite(self.mapped_file, self.index)
            if bad is not None:
                return bad
        return _nonfinite_rows(lambda start, n: self.index.reconstruct_n(start, n), self.ntotal)

    def load(self, folder: Path, mmap: bool = False) -> None:
        path = folder / "index.faiss"
        index = read_faiss(path, mmap, flat_codes=True)
        if not isinstance(index, faiss.IndexHNSWFlat) or index.d != self.dim:
            raise ValueError(f"{path} is not an HNSW index of dimension {self.dim}")
        index.hnsw.efSearch = self.params.hnsw_ef_search
        self.index = index
        self.mapped_file = path if mmap else None


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
