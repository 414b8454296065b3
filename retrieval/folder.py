"""Keep an index in step with a folder of images: embed only new or changed files, drop deleted ones."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from retrieval.datasets import list_image_files
from retrieval.embed import embed_images
from retrieval.images import PathLike
from retrieval.index import AUTO_APPROX_THRESHOLD, Index, resolve_kind


@dataclass
class FolderUpdate:
    """What :func:`index_folder` did; ``failures`` are ``(path, reason)`` of files that were skipped."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    converted_to: Optional[str] = None

    def summary(self) -> str:
        text = (f"{self.added} added, {self.updated} re-embedded, {self.removed} removed, "
                f"{self.unchanged} unchanged, {len(self.failures)} skipped (unreadable)")
        return text + (f"; converted to {self.converted_to}" if self.converted_to else "")


def _file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def index_folder(model: Any, root: PathLike, index: Optional[Index] = None, kind: str = "auto",
                 model_id: Optional[str] = None, preprocess: Optional[Callable] = None,
                 batch_size: int = 64, num_workers: int = 0, keep_missing: bool = False,
                 progress: bool = True, info: Optional[dict] = None) -> tuple[Index, FolderUpdate]:
    """Embed the images under ``root`` into ``index`` (a new one when None); returns (index, report).

    Items carry metadata ``{"path": relative path, "size", "mtime_ns"}``; on a re-run only files
    that are new or whose size / mtime changed are embedded, and files gone from the folder are
    removed (unless ``keep_missing``). With ``kind='auto'`` a flat index that grows past
    ``AUTO_APPROX_THRESHOLD`` items is converted to HNSW.
    """
    root = Path(root).resolve()
    files = list_image_files(root)
    rel = {p.relative_to(root).as_posix(): p for p in files}
    report = FolderUpdate()
    stale: list[int] = []
    known: dict[str, tuple[int, tuple[int, int]]] = {}
    if index is not None:
        for item_id, meta in index.items():
            path = meta.get("path")
            if path is not None:
                known[path] = (item_id, (meta.get("size"), meta.get("mtime_ns")))
    todo: list[str] = []
    for relpath, path in rel.items():
        if relpath in known:
            item_id, stamp = known[relpath]
            if stamp == _file_stamp(path):
                report.unchanged += 1
                continue
            stale.append(item_id)
            report.updated += 1
        todo.append(relpath)
    if not keep_missing:
        gone = [item_id for relpath, (item_id, _) in known.items() if relpath not in rel]
        stale.extend(gone)
        report.removed = len(gone)

    result = embed_images(model, [rel[r] for r in todo], batch_size=batch_size, num_workers=num_workers,
                          preprocess=preprocess, progress=progress)
    report.failures = result.failures
    done = [todo[i] for i in result.positions]
    updated_ok = {r for r in done if r in known}
    report.updated = len(updated_ok)
    report.added = len(done) - report.updated
    # a changed file that can no longer be read is dropped too (its old embedding is stale)
    metas = [{"path": r, "size": _file_stamp(rel[r])[0], "mtime_ns": _file_stamp(rel[r])[1]} for r in done]
    info = {**(index.info if index is not None else {}), **(info or {}), "root": str(root)}
    if index is None:
        if not done:
            raise ValueError(f"no readable images under {str(root)!r} ({len(result.failures)} skipped)")
        index = Index.build(result.embeddings, metadata=metas, kind=kind, model_id=model_id, info=info)
        return index, report
    index.info = info
    if stale:
        index.remove(stale, missing_ok=True)
    if done:
        index.add(result.embeddings, metadata=metas)
    if kind == "auto" and index.kind == "flat" and len(index) >= AUTO_APPROX_THRESHOLD:
        index = index.convert(resolve_kind("auto", len(index)))
        report.converted_to = index.kind
    elif kind not in ("auto", index.kind):
        index = index.convert(kind)
        report.converted_to = index.kind
    return index, report
