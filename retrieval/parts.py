"""Embeddings on disk in parts: ``EMB/part-RRRRR-SSSSS.npy`` written by many processes, resumable.

The input is one ordered list of N items (file paths, CSV rows, shard samples). Part ``S`` holds
items ``[S*part_size, (S+1)*part_size)`` and is embedded by rank ``S % world_size`` (``RRRRR`` in the
name is the rank that wrote it; ``SSSSS`` the part number). Item ids are the items' positions in
the list, so 1 process and N processes write the same ids, vectors and metadata. Per part:

- ``part-R-S.npy``: (n, D) float16 or float32, the embedded items in input order;
- ``part-R-S.jsonl``: one JSON object per row, ``{"id": ..., <item metadata>}``;
- ``part-R-S.json``: the part's summary (model id, dim, dtype, range, skipped items with reasons),
  written last: a part is finished when its summary exists.

Every file is written to a temporary name and renamed. ``manifest.json`` (model id, dim, dtype,
part size, items, parts) is written when every part is finished. A rerun skips finished parts.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from retrieval.names import json_text

FORMAT_NAME = "ernie-vl-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
_PART = re.compile(r"^part-(\d{5})-(\d{5})\.json$")

PathLike = Union[str, os.PathLike]


class PartsError(ValueError):
    """An embeddings folder that cannot be used as it is (mixed models or sizes, missing parts)."""


def part_name(rank: int, part: int) -> str:
    return f"part-{rank:05d}-{part:05d}"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class PartInfo:
    """One finished part, as its summary file describes it."""

    folder: Path
    name: str
    part: int
    rank: int
    start: int
    stop: int
    count: int
    dim: Optional[int]
    dtype: str
    model_id: Optional[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def vectors_path(self) -> Path:
        return self.folder / f"{self.name}.npy"

    @property
    def metadata_path(self) -> Path:
        return self.folder / f"{self.name}.jsonl"

    def vectors(self, mmap: bool = True) -> np.ndarray:
        """(count, dim) as stored (memory-mapped by default); a damaged file is a PartsError naming it."""
        if self.count == 0:
            return np.zeros((0, self.dim or 0), np.dtype(self.dtype))
        try:
            x = np.load(self.vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise PartsError(f"{self.vectors_path} cannot be read ({err}); delete part {self.name} and rerun embed")
        if x.shape != (self.count, self.dim):
            raise PartsError(f"{self.vectors_path} holds {x.shape}, its summary says ({self.count}, {self.dim})")
        return x

    def rows(self) -> list[dict]:
        """The metadata rows (each with ``id``), checked against the summary's count."""
        try:
            with open(self.metadata_path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as err:
            raise PartsError(f"{self.metadata_path} cannot be read ({err}); delete part {self.name} and rerun embed")
        if len(rows) != self.count or not all(isinstance(r, dict) and "id" in r for r in rows):
            raise PartsError(f"{self.metadata_path} holds {len(rows)} rows, expected {self.count} objects with an id")
        return rows


def write_part(folder: Path, rank: int, part: int, start: int, stop: int, vectors: np.ndarray,
               rows: Sequence[dict], skipped: Sequence[tuple[str, str]], model_id: Optional[str],
               dtype: str) -> PartInfo:
    """Write one part's vectors, rows and (last) summary, each by temporary file and rename."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if len(vectors) != len(rows):
        raise ValueError(f"{len(vectors)} vectors but {len(rows)} metadata rows")
    name = part_name(rank, part)
    x = np.ascontiguousarray(vectors, dtype=np.dtype(dtype))
    dim = int(x.shape[1]) if len(x) else None
    _atomic_write(folder / f"{name}.npy", lambda f: np.save(f, x, allow_pickle=False))
    _atomic_write(folder / f"{name}.jsonl", lambda f: f.writelines(json_text(r) + "\n" for r in rows), "w")
    info = PartInfo(folder, name, part, rank, start, stop, len(x), dim, dtype, model_id, list(skipped))
    summary = {"part": part, "rank": rank, "start": start, "stop": stop, "count": info.count, "dim": dim,
               "dtype": dtype, "model_id": model_id, "skipped": [list(s) for s in skipped]}
    _atomic_write(folder / f"{name}.json", lambda f: f.write(json_text(summary, indent=1)), "w")
    return info


def _read_summary(path: Path) -> PartInfo:
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
        return PartInfo(path.parent, path.stem, int(s["part"]), int(s["rank"]), int(s["start"]), int(s["stop"]),
                        int(s["count"]), s["dim"], s["dtype"], s.get("model_id"),
                        [tuple(x) for x in s.get("skipped", [])])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PartsError(f"part summary {path} cannot be read ({err}); delete it and rerun embed") from err


def finished_parts(folder: PathLike) -> dict[int, PartInfo]:
    """Part number -> the finished part (its summary exists); two summaries of one part are an error."""
    out: dict[int, PartInfo] = {}
    for path in sorted(Path(folder).glob("part-*-*.json")):
        if not _PART.match(path.name):
            continue
        info = _read_summary(path)
        if info.part in out:
            raise PartsError(f"part {info.part} was written twice ({out[info.part].name} and {info.name}); "
                             f"delete one of them")
        out[info.part] = info
    return out


def read_manifest(folder: PathLike) -> Optional[dict]:
    """The folder's manifest, or None when the embedding has not finished (or never ran)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise PartsError(f"{path} is not valid JSON: {err}") from err
    if m.get("format") != FORMAT_NAME:
        raise PartsError(f"{path} is not an {FORMAT_NAME} manifest (format={m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise PartsError(f"{path} has format version {m.get('format_version')}, this code reads {FORMAT_VERSION}")
    return m


def is_parts_folder(folder: PathLike) -> bool:
    """True when ``folder`` holds an embeddings manifest or finished parts."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / MANIFEST).is_file() or any(folder.glob("part-*-*.json")))


def check_parts(folder: PathLike, parts: dict[int, PartInfo], expected_parts: Optional[int] = None) -> tuple[int, Optional[str]]:
    """(dim, model_id) shared by every part; PartsError naming the parts that disagree or are missing."""
    if expected_parts is not None:
        missing = sorted(set(range(expected_parts)) - set(parts))
        if missing:
            raise PartsError(f"{folder}: {len(missing)} of {expected_parts} parts are not finished "
                             f"(parts {missing[:10]}); rerun the same embed command to finish them")
    filled = [p for p in parts.values() if p.count]
    if not filled:
        raise PartsError(f"{folder} holds no embedded items")
    for attr in ("dim", "model_id"):
        groups: dict[Any, list[str]] = {}
        for p in filled:
            groups.setdefault(getattr(p, attr), []).append(p.name)
        if len(groups) > 1:
            listing = "; ".join(f"{v!r}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
                                for v, names in groups.items())
            raise PartsError(f"{folder}: the parts disagree in {attr} ({listing}); "
                             f"an index needs one model and one embedding size")
    return int(filled[0].dim), filled[0].model_id


def iter_part_chunks(parts: dict[int, PartInfo], chunk: int = 65536) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """(vectors (n, D) float32, rows) chunk by chunk, parts in order; never more than ``chunk`` rows at once."""
    for number in sorted(parts):
        p = parts[number]
        if not p.count:
            continue
        x, rows = p.vectors(mmap=True), p.rows()
        for start in range(0, p.count, chunk):
            yield np.asarray(x[start:start + chunk], dtype=np.float32), rows[start:start + chunk]
