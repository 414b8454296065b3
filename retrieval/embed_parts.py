"""Embed a long list of images into ``EMB/`` parts (see :mod:`retrieval.parts`), one slice per rank, resumable."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

from retrieval.embed import embed_images
from retrieval.images import load_image
from retrieval.names import json_text
from retrieval.parts import (DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PartsError, _atomic_write, check_parts,
                             finished_parts, read_manifest, write_part)


@dataclass
class PartsReport:
    """What one rank did: parts embedded now, parts found finished, items embedded and skipped."""

    rank: int
    world_size: int
    parts_total: int
    parts_done: list[int] = field(default_factory=list)
    parts_reused: list[int] = field(default_factory=list)
    embedded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest: Optional[dict] = None


def num_parts(n_items: int, part_size: int) -> int:
    return (n_items + part_size - 1) // part_size


def _check_existing(out: Path, parts: dict, n_items: int, part_size: int, model_id: Optional[str]) -> None:
    """Refuse to mix: finished parts must cover the same ranges, made by the same model."""
    manifest = read_manifest(out)
    if manifest is not None and (manifest.get("items"), manifest.get("part_size")) != (n_items, part_size):
        raise PartsError(f"{out} holds an embedding of {manifest.get('items')} items in parts of "
                         f"{manifest.get('part_size')}; this run has {n_items} items in parts of {part_size}; "
                         f"use another --out")
    for number, p in parts.items():
        expect = (number * part_size, min(n_items, (number + 1) * part_size))
        if (p.start, p.stop) != expect:
            raise PartsError(f"{out}: part {p.name} covers items {p.start}..{p.stop}, this run expects "
                             f"{expect[0]}..{expect[1]} (another input or --part-size); use another --out")
        if p.count and p.model_id != model_id:
            raise PartsError(f"{out}: part {p.name} was embedded by model {p.model_id!r}, not {model_id!r}; "
                             f"use another --out")


def embed_to_parts(
    model: Any,
    items: Sequence[str],
    metadata: Sequence[dict],
    out: str | Path,
    rank: int = 0,
    world_size: int = 1,
    part_size: int = 10000,
    dtype: str = "float16",
    model_id: Optional[str] = None,
    opener: Callable[[str], Any] = load_image,
    preprocess: Optional[Callable] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    barrier: Optional[Callable[[], None]] = None,
    info: Optional[dict] = None,
    progress: bool = True,
) -> PartsReport:
    """Embed this rank's parts of ``items`` (``opener(item) -> PIL.Image``) into ``out``.

    ``metadata[i]`` is stored with item ``i`` (id ``i``). Finished parts are skipped. After
    ``barrier()`` (every rank done), rank 0 writes ``manifest.json`` (with ``info``: the source, the
    model spec) when every part is finished.
    """
    if len(items) != len(metadata):
        raise ValueError(f"{len(items)} items but {len(metadata)} metadata entries")
    if not len(items):
        raise ValueError("nothing to embed: the input lists no items")
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = num_parts(len(items), part_size)
    done = finished_parts(out)
    _check_existing(out, done, len(items), part_size, model_id)
    report = PartsReport(rank, world_size, total)
    mine = [s for s in range(rank, total, world_size)]
    report.parts_reused = [s for s in mine if s in done]
    todo = [s for s in mine if s not in done]
    bar = tqdm(total=sum(min(len(items), (s + 1) * part_size) - s * part_size for s in todo),
               desc=f"embedding (rank {rank}/{world_size})", unit="img", disable=not progress)
    for s in todo:
        start, stop = s * part_size, min(len(items), (s + 1) * part_size)
        result = embed_images(model, items[start:stop], batch_size=batch_size, num_workers=num_workers,
                              preprocess=preprocess, progress=False, opener=opener)
        rows = [{"id": start + p, **metadata[start + p]} for p in result.positions]
        write_part(out, rank, s, start, stop, result.embeddings, rows, result.failures, model_id, dtype)
        report.parts_done.append(s)
        report.embedded += len(rows)
        report.skipped.extend(result.failures)
        bar.update(stop - start)
        if result.failures:
            bar.set_postfix(skipped=len(report.skipped))
    bar.close()
    if barrier is not None:
        barrier()
    if rank == 0:
        report.manifest = write_manifest(out, total, len(items), part_size, dtype, info)
    return report


def write_manifest(out: Path, total: int, n_items: int, part_size: int, dtype: str,
                   info: Optional[dict] = None) -> Optional[dict]:
    """``manifest.json`` once all ``total`` parts are finished and agree; None while some are missing."""
    parts = finished_parts(out)
    if len(parts) < total:
        return None
    dim, model_id = check_parts(out, parts, total)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_id": model_id, "dim": dim,
                "dtype": dtype, "items": n_items, "part_size": part_size, "parts": total,
                "embedded": sum(p.count for p in parts.values()),
                "skipped": sum(len(p.skipped) for p in parts.values()), "info": dict(info or {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_write(out / MANIFEST, lambda f: f.write(json_text(manifest, indent=1)), "w")
    return manifest
