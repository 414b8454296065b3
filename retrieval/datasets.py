"""Datasets for image folders and image-caption CSVs; unreadable images yield None (skipped by the collate)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset, default_collate

from retrieval.images import ImageLoadError, PathLike, is_image_path, load_image

Transform = Callable[[Any], torch.Tensor]


def list_image_files(root: PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files (by extension) under ``root``; hidden files and folders are skipped."""
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"image folder {str(base)!r} does not exist or is not a folder")
    pattern = base.rglob("*") if recursive else base.glob("*")
    files = [
        p for p in pattern
        if p.is_file() and is_image_path(p)
        and not any(part.startswith(".") for part in p.relative_to(base).parts)
    ]
    return sorted(files)


class ImageFiles(Dataset):
    """Images from a list of paths; item ``(image (3,H,W), index)`` or None when unreadable.

    ``failures`` collects ``(path, reason)`` of unreadable files seen in *this* process
    (with DataLoader workers, the embedding loop counts the Nones instead).
    """

    def __init__(self, paths: Sequence[PathLike], transform: Transform) -> None:
        if transform is None or not callable(transform):
            raise TypeError(f"transform must be a callable PIL.Image -> tensor, got {type(transform).__name__}")
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.failures: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, int]]:
        path = self.paths[index]
        try:
            image = self.transform(load_image(path))
        except ImageLoadError as err:
            self.failures.append((str(path), err.reason))
            return None
        except Exception as err:  # a transform that chokes on one odd image must not stop a batch job
            self.failures.append((str(path), f"{type(err).__name__}: {err}"))
            return None
        return image, index


class ImageFolderFiles(ImageFiles):
    """All image files under ``root`` (sorted, recursive); ``relpaths`` are relative to ``root``."""

    def __init__(self, root: PathLike, transform: Transform, recursive: bool = True) -> None:
        self.root = Path(root)
        super().__init__(list_image_files(self.root, recursive=recursive), transform)

    @property
    def relpaths(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]


def read_text_file(path: PathLike) -> str:
    """The file's text as UTF-8 (a BOM is dropped); a bad byte raises ValueError naming the file and the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{str(path)!r} is not UTF-8 text: line {line} has the byte {data[err.start:err.start + 1]!r} "
                         f"(byte offset {err.start}); save the file as UTF-8") from None


def read_csv_columns(path: PathLike, columns: Sequence[str], hint: str = "") -> list[tuple[str, ...]]:
    """Rows of ``columns`` from a CSV with a header; a missing column or non-UTF-8 byte names the file."""
    import io

    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{str(path)!r} has no column(s) {missing}; its header is {header}"
                         + (f" ({hint} to the right names)" if hint else ""))
    rows = []
    for row in reader:
        values = tuple(row[c] for c in columns)
        if any(v is None for v in values):
            raise ValueError(f"{str(path)!r} line {reader.line_num}: the row has fewer fields than the header {header}")
        rows.append(values)
    return rows


class ImageTextCSV(Dataset):
    """Image-caption pairs from a CSV with a header; paths are relative to the CSV's folder.

    Item ``(image (3,H,W) float, caption str, index int)``, or None when the image
    cannot be read (recorded in ``failures``). Several rows may share one image
    (Flickr30K / COCO style); ``image_paths`` and ``text_to_image`` describe that grouping.
    """

    def __init__(
        self,
        csv_path: PathLike,
        transform: Optional[Transform],
        image_col: str = "filepath",
        caption_col: str = "caption",
    ) -> None:
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise ValueError(f"captions CSV {str(self.csv_path)!r} does not exist")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.transform = transform
        self.image_col, self.caption_col = image_col, caption_col
        root = self.csv_path.parent
        rows = read_csv_columns(self.csv_path, (image_col, caption_col), hint="set image_col= / caption_col=")
        if not rows:
            raise ValueError(f"captions CSV {str(self.csv_path)!r} has no rows")
        self.paths: list[Path] = [Path(p) if os.path.isabs(p) else root / p for p, _ in rows]
        self.captions: list[str] = [c for _, c in rows]
        self.failures: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image_paths(self) -> list[Path]:
        """Distinct image paths in first-seen order."""
        return list(dict.fromkeys(self.paths))

    @property
    def text_to_image(self) -> list[int]:
        """For each row j, the position of its image in :attr:`image_paths`."""
        position = {p: i for i, p in enumerate(self.image_paths)}
        return [position[p] for p in self.paths]

    def __getitem__(self, index: int) -> Optional[tuple[Any, str, int]]:
        path = self.paths[index]
        try:
            image = load_image(path)
            if self.transform is not None:
                image = self.transform(image)
        except ImageLoadError as err:
            self.failures.append((str(path), err.reason))
            return None
        except Exception as err:
            self.failures.append((str(path), f"{type(err).__name__}: {err}"))
            return None
        return image, self.captions[index], index


def collate_skip_none(batch: list[Any]) -> Any:
    """``default_collate`` over the items that are not None; returns None when all are None."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)
