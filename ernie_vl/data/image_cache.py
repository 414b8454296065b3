"""Decoded training images: uint8 (N,3,S,S) in one preallocated array, or a memory-mapped cache file.

Decoding runs once through DataLoader workers that write each image's uint8 pixels straight
into its row of one shared array (``ernie_vl.data.row_writer``): no pixels cross a pipe, no
shared-memory handle per image or batch (one per image, kept alive, exhausted ``ulimit -n``
at 2,000 images before), and the main process copies nothing.

With a cache folder the array is a numpy memmap on disk,
``<cache>/<key>.u8`` + ``<key>.json`` (shape, failed rows). The key hashes the CSVs'
content, the transform and every image file's size and mtime, so a rerun on the same data
maps the file instead of decoding, and an edited file makes a new entry. One process decodes an
entry at a time (a lock file; other ranks wait and then map it). Decoding writes
``<key>.u8.partial`` and records its progress every few thousand images: an interrupted
decode resumes where it stopped; the finished file is renamed into place. Without a cache
folder the array lives in RAM.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ernie_vl.data.row_writer import RowTarget, RowWriter, as_is, worker_context

PROGRESS_EVERY = 4096  # images between two progress records of a cached decode
CHUNK = 64  # images per worker task


@dataclass
class DecodedImages:
    """``pixels`` uint8 (N,3,S,S) (RAM or memmap), ``rows`` the decoded rows, ``failed`` [(row, reason)]."""

    pixels: torch.Tensor
    rows: torch.Tensor
    failed: list[tuple[int, str]]
    cache_file: Optional[Path] = None


def file_stamps(paths: Sequence[str]) -> list:
    """(path, size, mtime_ns) of each file; (path, -1, -1) for a missing one."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1))
    return out


def cache_key(*parts: Any) -> str:
    """20 hex digits of the JSON of ``parts``."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def decode_into(out: RowTarget, paths: Sequence[str], preprocess: Callable, start: int = 0, num_workers: int = 2,
                progress: bool = True, desc: str = "decoding images",
                checkpoint: Optional[Callable[[int, list], None]] = None,
                failed: Optional[list[tuple[int, str]]] = None) -> list[tuple[int, str]]:
    """Decode ``paths[start:]`` into rows of ``out``; returns [(row, reason)] of the failures (appended to ``failed``).

    The workers write the rows themselves (``ernie_vl.data.row_writer``); ``checkpoint(done_rows, failed)``
    is called every :data:`PROGRESS_EVERY` images (chunks arrive in order, so rows below ``done_rows`` are written).
    """
    from tqdm import tqdm

    failed = [] if failed is None else failed
    n = len(paths)
    if start >= n:
        return failed
    writer = RowWriter(paths, preprocess, out, start=start, chunk=CHUNK)
    loader = DataLoader(writer, batch_size=None, num_workers=num_workers, collate_fn=as_is,
                        multiprocessing_context=worker_context(out, num_workers),
                        prefetch_factor=4 if num_workers else None)
    done, since = start, 0
    with tqdm(total=n, initial=start, desc=desc, disable=not progress, leave=False, unit="img") as bar:
        for count, bad in loader:
            failed.extend(bad)
            done += count
            since += count
            bar.update(count)
            if checkpoint is not None and since >= PROGRESS_EVERY:
                checkpoint(done, failed)
                since = 0
    return failed


def _sync(path: Path) -> None:
    """Write the file's dirty pages (from any process's mapping) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)
    finally:
        os.close(fd)


def _kept(n: int, failed: list[tuple[int, str]]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    if failed:
        keep[torch.tensor([r for r, _ in failed], dtype=torch.int64)] = False
    return keep.nonzero().flatten()


def decode_images(paths: Sequence[str], preprocess: Callable, cache_dir: Optional[str | Path] = None,
                  key_parts: Sequence[Any] = (), num_workers: int = 2, progress: bool = True) -> DecodedImages:
    """All of ``paths`` decoded to uint8 with ``preprocess``; in RAM, or memory-mapped from ``cache_dir``."""
    n, size = len(paths), int(preprocess.image_size)
    shape = (n, 3, size, size)
    if not cache_dir:
        if num_workers and "fork" not in multiprocessing.get_all_start_methods():
            return _decode_via_temp_file(paths, preprocess, shape, num_workers, progress)
        target = RowTarget(shape)
        failed = decode_into(target, paths, preprocess, num_workers=num_workers, progress=progress)
        return DecodedImages(torch.from_numpy(target.array()), _kept(n, failed), failed)

    try:
        return _decode_cached(paths, preprocess, Path(cache_dir).expanduser(), key_parts, shape, num_workers, progress)
    except OSError as err:  # a read-only or full cache disk is no reason to fail: decode into RAM
        import warnings

        warnings.warn(f"decoded-image cache in {str(cache_dir)!r} not usable ({err}); decoding into memory")
        return decode_images(paths, preprocess, None, key_parts, num_workers, progress)


def _decode_via_temp_file(paths: Sequence[str], preprocess: Callable, shape: tuple[int, ...], num_workers: int,
                          progress: bool) -> DecodedImages:
    """Without fork, workers reach the rows through a temporary file (removed once mapped here)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ernie-vl-decode-"))
    path = folder / "rows.u8"
    try:
        with open(path, "wb") as f:
            f.truncate(int(np.prod(shape)))
        failed = decode_into(RowTarget(shape, str(path)), paths, preprocess, num_workers=num_workers,
                             progress=progress)
        pixels = torch.from_numpy(np.array(np.memmap(path, dtype=np.uint8, mode="r", shape=shape)))
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()
    return DecodedImages(pixels, _kept(len(paths), failed), failed)


def _decode_cached(paths: Sequence[str], preprocess: Callable, folder: Path, key_parts: Sequence[Any],
                   shape: tuple[int, ...], num_workers: int, progress: bool) -> DecodedImages:
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key("images-v2", repr(preprocess), list(key_parts), file_stamps(paths))
    # one decoder per entry: other processes (ranks, a second run) wait, then map the finished file
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _decode_locked(paths, preprocess, folder, key, shape, num_workers, progress)


def _decode_locked(paths: Sequence[str], preprocess: Callable, folder: Path, key: str, shape: tuple[int, ...],
                   num_workers: int, progress: bool) -> DecodedImages:
    n = shape[0]
    data, meta = folder / f"{key}.u8", folder / f"{key}.json"
    expected = int(np.prod(shape))
    if meta.is_file() and data.is_file() and data.stat().st_size == expected:
        info = json.loads(meta.read_text())
        failed = [(int(r), str(why)) for r, why in info["failed"]]
        array = np.memmap(data, dtype=np.uint8, mode="c", shape=shape)
        return DecodedImages(torch.from_numpy(array), _kept(n, failed), failed, data)

    partial, record = folder / f"{key}.u8.partial", folder / f"{key}.progress.json"
    start, failed = 0, []
    if partial.is_file() and record.is_file() and partial.stat().st_size == expected:
        info = json.loads(record.read_text())
        start, failed = int(info["done"]), [(int(r), str(why)) for r, why in info["failed"]]
    else:
        with open(partial, "wb") as f:
            f.truncate(expected)  # sparse until written
    target = RowTarget(shape, str(partial))

    def checkpoint(done: int, failed_so_far: list) -> None:
        _sync(partial)  # the rows the workers wrote reach the disk before the record that counts them
        _write_json(record, {"done": done, "failed": failed_so_far})

    failed = decode_into(target, paths, preprocess, start=start, num_workers=num_workers, progress=progress,
                         checkpoint=checkpoint, failed=failed)
    _sync(partial)
    os.replace(partial, data)
    _write_json(meta, {"shape": list(shape), "failed": failed, "count": n})
    record.unlink(missing_ok=True)
    array = np.memmap(data, dtype=np.uint8, mode="c", shape=shape)
    return DecodedImages(torch.from_numpy(array), _kept(n, failed), failed, data)
