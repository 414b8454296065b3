"""The items of an index: slot -> id (int64 array) and per-slot JSON metadata, kept compact.

Metadata rows are UTF-8 JSON lines in one byte buffer with an (N+1,) int64 offsets array, decoded
only when asked for: a million names cost their bytes, not a million Python dicts. On disk the same
layout is ``metadata.jsonl`` (one object per line, readable by any tool) beside
``metadata.offsets.npy``; ``open(mmap=True)`` maps both files and the ids. The ids are checked
(no repeats, none below -1) when the table is written and that record (:meth:`ItemTable.summary`) is
kept in the index manifest: a mapped open given it reads nothing whole, and re-checks the ids at the
first lookup by id (which sorts them once); without it the open checks them. Lookups by id use that
sort (``searchsorted``).
"""
from __future__ import annotations

import json
import mmap as _mmap
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from retrieval.names import json_text

IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.jsonl"
OFFSETS_FILE = "metadata.offsets.npy"
_NULL = b"null\n"


class IndexMismatchError(ValueError):
    """The saved index does not match what the caller expects (model, size, format) or is damaged."""


def _line_offsets(buf: Union[bytes, bytearray, _mmap.mmap]) -> np.ndarray:
    """(N+1,) start offsets of the newline-terminated lines of ``buf``."""
    if len(buf) == 0:
        return np.zeros(1, np.int64)
    ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10).astype(np.int64) + 1
    if len(ends) == 0 or ends[-1] != len(buf):
        ends = np.append(ends, len(buf))                 # a last line without its newline
    return np.concatenate([[0], ends])


def _strictly_increasing(ids: np.ndarray, block: int = 1 << 16) -> bool:
    """True when every id is above the one before it (read block by block: no full-size temporaries)."""
    for start in range(0, max(len(ids) - 1, 0), block):
        a = np.asarray(ids[start:start + block + 1])
        if not (a[1:] > a[:-1]).all():
            return False
    return True


class ItemTable:
    """Slots ``0..N-1``: ``slot_ids`` (id, or -1 once removed) and one metadata row per slot."""

    def __init__(self) -> None:
        self.slot_ids = np.zeros(0, np.int64)
        self._buf: Union[bytearray, bytes, _mmap.mmap] = bytearray()
        self._offsets = np.zeros(1, np.int64)
        self._pending: list[np.ndarray] = []          # row lengths appended since the offsets were last joined
        self._order: Optional[np.ndarray] = None      # argsort of slot_ids (the id lookup), built when needed
        self._sorted: Optional[np.ndarray] = None
        self._alive_mask: Optional[np.ndarray] = None  # slot_ids >= 0, built when a search first needs it
        self.alive = 0
        self.lazy_rows = False                        # rows checked when read (mmap), not at open
        self.where = ""                               # the folder, while the ids wait for their check
        self.max_id: Optional[int] = None             # the largest id, from the manifest's record
        self.min_id: Optional[int] = None             # the smallest live id, from the manifest's record

    # ------------------------------------------------------------------ rows
    def _joined_offsets(self) -> np.ndarray:
        if self._pending:
            lengths = np.concatenate(self._pending)
            self._offsets = np.concatenate([self._offsets, self._offsets[-1] + np.cumsum(lengths)])
            self._pending = []
        return self._offsets

    def row(self, slot: int) -> Optional[dict]:
        off = self._joined_offsets()
        text = bytes(self._buf[off[slot]:off[slot + 1]])
        try:
            meta = json.loads(text)
        except ValueError as err:
            raise IndexMismatchError(f"metadata row {slot} is not valid JSON ({err}): {text[:80]!r}") from err
        if not isinstance(meta, dict) and not (meta is None and self.slot_ids[slot] < 0):
            raise IndexMismatchError(f"metadata row {slot} is not a JSON object: {text[:80]!r}")
        return meta

    @property
    def rows(self) -> int:
        return len(self._joined_offsets()) - 1

    # ------------------------------------------------------------------ ids
    def _lookup(self) -> tuple[Optional[np.ndarray], np.ndarray]:
        """(order, ids in ascending order); order None when the slots already hold strictly increasing ids (the
        usual case: ids given in order, or none removed), so the lookup reads ``slot_ids`` itself (a memory map
        stays a memory map) and costs no memory."""
        if self._sorted is None:
            if _strictly_increasing(self.slot_ids):
                self._order, self._sorted = None, self.slot_ids
            else:
                self._order = np.argsort(self.slot_ids, kind="stable")
                self._sorted = self.slot_ids[self._order]
            if self.where:  # a mapped open trusted the manifest's record: check now that the ids are read anyway
                where, self.where = self.where, ""
                try:
                    self._check_ids(where)
                except IndexMismatchError:
                    self.where, self._order, self._sorted = where, None, None  # refused again next time
                    raise
        return self._order, self._sorted

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> their slots, -1 for ids not in the table."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(self.slot_ids) == 0:
            return np.full(len(ids), -1, np.int64)
        order, ordered = self._lookup()
        pos = np.clip(np.searchsorted(ordered, ids), 0, len(ordered) - 1)
        found = (ordered[pos] == ids) & (ids >= 0)
        return np.where(found, pos if order is None else order[pos], -1)

    def duplicate_ids(self) -> np.ndarray:
        """Ids (>= 0) held by more than one slot."""
        _, ordered = self._lookup()
        return self._repeats(ordered)

    @staticmethod
    def _repeats(ordered: np.ndarray) -> np.ndarray:
        same = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)
        return np.unique(ordered[1:][same])

    def summary(self) -> dict:
        """What the write-time check found, for the manifest: ``alive`` count, ``min_id`` / ``max_id`` of the
        live ids (-1: none), ``unique`` (no id held twice, none below -1)."""
        _, ordered = self._lookup()
        unique = not len(self._repeats(ordered)) and not (len(ordered) and ordered[0] < -1)
        lo, hi = self.id_range() or (-1, -1)
        return {"alive": int(self.alive), "min_id": lo, "max_id": hi, "unique": bool(unique)}

    def id_range(self) -> Optional[tuple[int, int]]:
        """(smallest, largest) live id, None when none is alive; from the manifest's record when the table
        was opened with one (nothing read), else from the sorted ids."""
        if self.where and self.min_id is not None:
            return (self.min_id, self.max_id) if self.alive else None
        _, ordered = self._lookup()
        first = int(np.searchsorted(ordered, 0))
        return (int(ordered[first]), int(ordered[-1])) if first < len(ordered) else None

    def sorted_ids(self) -> np.ndarray:
        """The live ids in ascending order (a view of the ids when they are stored in order)."""
        _, ordered = self._lookup()
        return ordered[int(np.searchsorted(ordered, 0)):]

    # ------------------------------------------------------------------ changes
    def append(self, ids: np.ndarray, metas: Sequence[Optional[dict]]) -> None:
        lines = [json_text(m).encode("utf-8") + b"\n" for m in metas]  # non-UTF-8 names as \udcXX escapes
        if not isinstance(self._buf, bytearray):
            self._buf = bytearray(self._buf)
        self._buf += b"".join(lines)
        self._pending.append(np.fromiter((len(x) for x in lines), np.int64, len(lines)))
        self.slot_ids = np.concatenate([self.slot_ids, ids])
        self.alive += len(ids)
        self._order = self._sorted = self._alive_mask = None

    def kill(self, slots: np.ndarray) -> None:
        """Mark slots removed (their rows are written as ``null`` on save)."""
        self.slot_ids[slots] = -1
        self.alive = int((self.slot_ids >= 0).sum())
        self._order = self._sorted = self._alive_mask = None

    def compact(self, keep: np.ndarray) -> None:
        off = self._joined_offsets()
        lengths = np.diff(off)
        data = np.frombuffer(self._buf, np.uint8, count=int(off[-1]))[np.repeat(np.asarray(keep, bool), lengths)]
        self._buf = bytearray(data.tobytes())
        self._offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
        self.slot_ids = self.slot_ids[keep]
        self.alive = int((self.slot_ids >= 0).sum())
        self._order = self._sorted = self._alive_mask = None

    def alive_mask(self) -> Optional[np.ndarray]:
        """(N,) bool, True where a slot holds an item; None when no slot was removed (known from the count:
        nothing is read). Built once and kept until the table changes, so repeated searches of a mapped
        index do not read every id again."""
        if self.alive == len(self.slot_ids):
            return None
        if self._alive_mask is None:
            self._alive_mask = np.asarray(self.slot_ids >= 0)
        return self._alive_mask

    def items(self) -> Iterator[tuple[int, dict]]:
        for slot in np.flatnonzero(self.slot_ids >= 0):
            yield int(self.slot_ids[slot]), self.row(int(slot))

    # ------------------------------------------------------------------ files
    def save(self, folder: Path) -> list[str]:
        """ids.npy, metadata.jsonl (removed slots as ``null``) and its offsets; returns the file names."""
        off = self._joined_offsets()
        dead = np.flatnonzero(self.slot_ids < 0)
        np.save(folder / IDS_FILE, np.asarray(self.slot_ids))
        with open(folder / METADATA_FILE, "wb") as f:
            if len(dead) == 0:
                f.write(self._buf)
            else:
                start = 0
                for s in dead:                             # the rows between removed slots, written whole
                    f.write(self._buf[off[start]:off[s]])
                    f.write(_NULL)
                    start = s + 1
                f.write(self._buf[off[start]:off[-1]])
        lengths = np.diff(off)
        lengths[dead] = len(_NULL)
        np.save(folder / OFFSETS_FILE, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        return [IDS_FILE, METADATA_FILE, OFFSETS_FILE]

    @classmethod
    def open(cls, folder: Path, mmap: bool = False, summary: Optional[dict] = None) -> "ItemTable":
        """The items of a saved index; ``mmap`` maps the files (rows are checked as they are read) and, given
        the manifest's ``summary`` of a write-time check, reads none of the ids until they are looked up."""
        table = cls()
        table.slot_ids = np.load(folder / IDS_FILE, allow_pickle=False, mmap_mode="r" if mmap else None)
        if table.slot_ids.dtype != np.int64 or table.slot_ids.ndim != 1:
            raise IndexMismatchError(f"{folder / IDS_FILE} holds {table.slot_ids.dtype} {table.slot_ids.shape}, "
                                     f"expected int64 (N,)")
        path = folder / METADATA_FILE
        if mmap and path.stat().st_size:
            with open(path, "rb") as f:
                table._buf = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
        else:
            table._buf = path.read_bytes()
        offsets_path = folder / OFFSETS_FILE
        if offsets_path.is_file():
            table._offsets = np.load(offsets_path, allow_pickle=False, mmap_mode="r" if mmap else None)
            off = table._offsets
            if off.ndim != 1 or off.dtype != np.int64 or off[0] != 0 or off[-1] != len(table._buf):
                raise IndexMismatchError(f"{offsets_path} does not match {path} ({len(table._buf)} bytes)")
        else:                                              # an index written before the offsets file
            table._offsets = _line_offsets(table._buf)
        trusted = mmap and bool(summary and summary.get("unique"))
        table.alive = int(summary["alive"]) if trusted else int((table.slot_ids >= 0).sum())
        table.lazy_rows = mmap
        table.where = str(folder) if trusted else ""
        table.max_id = int(summary["max_id"]) if trusted else None
        table.min_id = int(summary["min_id"]) if trusted and "min_id" in summary else None
        return table

    def _check_ids(self, folder: Union[Path, str]) -> None:
        """IndexMismatchError for ids below -1 or held twice (reads every id)."""
        ids = self.slot_ids
        if (ids < -1).any():
            raise IndexMismatchError(f"index {folder} is damaged: ids below -1 ({sorted(set(ids[ids < -1].tolist()))[:10]})")
        alive = int((ids >= 0).sum())
        if alive != self.alive:  # a mapped open took the count from the manifest
            raise IndexMismatchError(f"index {folder} is damaged: {alive} live ids, the manifest records {self.alive}")
        dup = self.duplicate_ids()
        if len(dup):
            raise IndexMismatchError(f"index {folder} is damaged: duplicate ids {dup[:10].tolist()} "
                                     f"({len(dup)} ids appear more than once)")

    def check(self, folder: Path, next_id: int) -> None:
        """IndexMismatchError for ids below -1, repeated ids, a next_id not above them, and (unless the rows are
        lazy) metadata rows that are not JSON objects. A mapped table opened with the manifest's record
        checks next_id against it and leaves the ids to the first lookup."""
        if self.where:
            largest = self.max_id
        else:
            self._check_ids(folder)
            _, ordered = self._lookup()
            largest = int(ordered[-1]) if len(ordered) else -1
        if largest >= 0 and int(next_id) <= largest:
            raise IndexMismatchError(f"index {folder} is damaged: next_id {next_id} is not above the "
                                     f"largest id {largest}")
        if self.lazy_rows:
            return
        wrong = []
        for slot in range(self.rows):
            try:
                self.row(slot)
            except IndexMismatchError:
                wrong.append(slot)
                if len(wrong) == 10:
                    break
        if wrong:
            raise IndexMismatchError(f"index {folder} is damaged: metadata rows {wrong} are not JSON objects")
