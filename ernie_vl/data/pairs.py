"""Image-text pairs listed from CSVs, and the worker-side decoding of their images to uint8.

``PairList`` reads ``filepath,caption`` CSVs (paths relative to each CSV's folder): rows
with an empty caption are dropped, counted and listed (``skipped``). ``PairImages`` is the
map-style dataset that DataLoader workers run: index -> uint8 (3,S,S) pixels of the model's
transform, or the reason it failed. ``collate_uint8`` stacks a batch in the worker, so one
batch crosses the process boundary as ONE shared-memory tensor (one file descriptor,
released when the main process has copied it), never one per image.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class PairList:
    """``paths`` (absolute or CSV-relative resolved), ``captions``; ``skipped`` (path, reason) rows left out."""

    paths: list[str]
    captions: list[str]
    sources: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    digest: str = ""

    @classmethod
    def from_csvs(cls, csv_paths: Sequence[str | Path], image_col: str = "filepath",
                  caption_col: str = "caption") -> "PairList":
        from retrieval.datasets import read_csv_columns

        paths, captions, skipped = [], [], []
        sha = hashlib.sha1()
        for csv_path in csv_paths:
            csv_path = Path(csv_path)
            if not csv_path.is_file():
                raise ValueError(f"captions CSV {str(csv_path)!r} does not exist")
            sha.update(csv_path.read_bytes())
            rows = read_csv_columns(csv_path, (image_col, caption_col), hint="set --image-col / --caption-col")
            if not rows:
                raise ValueError(f"captions CSV {str(csv_path)!r} has no rows")
            root = csv_path.parent
            for path, caption in rows:
                full = path if os.path.isabs(path) else str(root / path)
                if not caption.strip():
                    skipped.append((full, "empty caption"))
                    continue
                paths.append(full)
                captions.append(caption)
        if not paths:
            raise ValueError(f"no pairs with a caption in {[str(p) for p in csv_paths]}")
        return cls(paths, captions, [str(p) for p in csv_paths], skipped, sha.hexdigest())

    def __len__(self) -> int:
        return len(self.paths)


class PairImages(Dataset):
    """index -> ``(index, uint8 (3,S,S) or None, reason or None)``; unreadable files never raise."""

    def __init__(self, paths: Sequence[str], preprocess: Callable) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        pixels, reason = decode_uint8(self.paths[index], self.preprocess)
        return index, (None if pixels is None else torch.from_numpy(np.ascontiguousarray(pixels))), reason


def decode_uint8(path: str, preprocess: Callable) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 (3,S,S) pixels of ``preprocess`` or None, the reason it failed or None); never raises.

    A transform with ``to_uint8`` (``ernie_vl.preprocess.ImageTransform``) gives the pixels directly,
    with a JPEG decoded at a reduced DCT scale first (``load_image(draft=S)``); any other transform
    is run and its normalisation undone.
    """
    from retrieval.images import ImageLoadError, load_image

    direct = getattr(preprocess, "to_uint8", None)
    try:
        image = load_image(path, draft=int(preprocess.image_size) if direct is not None else None)
        if direct is not None:
            return direct(image), None
        from ernie_vl.data.sources import Normaliser

        norm = Normaliser(tuple(preprocess.mean), tuple(preprocess.std))
        return norm.to_uint8(preprocess(image)).numpy(), None
    except ImageLoadError as err:
        return None, err.reason
    except Exception as err:  # a transform that chokes on one odd image must not stop the job
        return None, f"{type(err).__name__}: {err}"


def collate_uint8(items: list) -> tuple[torch.Tensor, Optional[torch.Tensor], list[tuple[int, str]]]:
    """(indices of the decoded items (k,), their pixels (k,3,S,S) uint8 or None, [(index, reason)] failed)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    rows = torch.tensor([i for i, _ in good], dtype=torch.int64)
    pixels = torch.stack([x for _, x in good]) if good else None
    return rows, pixels, failed
