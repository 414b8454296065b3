"""Decoding workers that write uint8 rows straight into one shared array (no pixels cross a pipe).

``RowTarget`` is the array of decoded images, uint8 (N,3,S,S): an anonymous shared memory
mapping (forked workers inherit it; RAM, not /dev/shm, so no tmpfs size limit applies) or a
file mapped ``MAP_SHARED`` (the decode cache; each process maps it itself, so it also works
with ``spawn``). ``RowWriter`` is the map-style dataset the DataLoader workers run: item ``i``
is a chunk of consecutive rows; the worker decodes each image (``pairs.decode_uint8``) into
its row and returns only ``(rows done, [(row, reason)] failed)``. The main process thus never
copies pixels, never receives a shared-memory handle per batch, and stays free to do
other work; chunks arrive in order, so a progress record is exact.
"""
from __future__ import annotations

import mmap
import multiprocessing
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from ernie_vl.data.pairs import decode_uint8


class RowTarget:
    """uint8 array ``shape`` (N,3,S,S) shared with worker processes; ``array()`` maps it in this process."""

    def __init__(self, shape: Sequence[int], path: Optional[str] = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.path = path
        self._mm: Optional[mmap.mmap] = None
        self._view: Optional[np.ndarray] = None
        if path is None:  # anonymous shared memory, zero-filled; lives as long as a process maps it
            self._mm = mmap.mmap(-1, max(1, int(np.prod(self.shape))), flags=mmap.MAP_SHARED)

    @property
    def needs_fork(self) -> bool:
        """An anonymous mapping reaches workers only through fork."""
        return self.path is None

    def array(self) -> np.ndarray:
        """The (N,3,S,S) uint8 view in this process (mapped on first use)."""
        if self._view is None:
            if self._mm is not None:
                self._view = np.frombuffer(self._mm, dtype=np.uint8, count=int(np.prod(self.shape))).reshape(self.shape)
            else:
                self._view = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=self.shape)
        return self._view

    def __getstate__(self) -> dict:
        if self._mm is not None:
            raise TypeError("an anonymous shared RowTarget reaches worker processes only by fork")
        return {"shape": self.shape, "path": self.path, "_mm": None, "_view": None}


class RowWriter(Dataset):
    """Chunk ``i`` -> ``(rows handled, [(row, reason)] failed)``; writes rows ``start + i*chunk ...`` of ``target``."""

    def __init__(self, paths: Sequence[str], preprocess: Callable, target: RowTarget, start: int = 0,
                 chunk: int = 64) -> None:
        self.paths, self.preprocess, self.target = list(paths), preprocess, target
        self.start, self.chunk = start, chunk

    def __len__(self) -> int:
        return max(0, -(-(len(self.paths) - self.start) // self.chunk))

    def __getitem__(self, index: int) -> tuple[int, list[tuple[int, str]]]:
        out = self.target.array()
        lo = self.start + index * self.chunk
        hi = min(len(self.paths), lo + self.chunk)
        failed = []
        for row in range(lo, hi):
            pixels, reason = decode_uint8(self.paths[row], self.preprocess)
            if pixels is None:
                failed.append((row, reason or "undecodable"))
            else:
                out[row] = pixels
        return hi - lo, failed


def as_is(item):
    """DataLoader collate for already-batched items."""
    return item


def worker_context(target: RowTarget, num_workers: int) -> Optional[str]:
    """The multiprocessing start method the workers need (``"fork"`` for anonymous memory), or None for the default.

    Raises ValueError when anonymous memory cannot reach workers on this platform.
    """
    if num_workers == 0 or not target.needs_fork:
        return None
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError("decoding into shared memory with workers needs the 'fork' start method; "
                         "pass a cache folder (decode_cache) or num_workers=0 on this platform")
    return "fork"
