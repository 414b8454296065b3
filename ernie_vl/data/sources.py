"""Training data sources: image-text pairs and labelled videos, decoded once into memory when small.

A source is indexed by sample id and turns a LongTensor of ids into model-ready
tensors. Two kinds:

* cached (``CachedPairs`` / ``CachedVideos``): every item is decoded once (in
  DataLoader worker processes) with the model's transform, and stored as uint8
  pixels (the normalisation is undone, rounded, and redone per batch: 4x smaller
  than float32, and a batch is one index + one fused multiply-add). Images go into
  one preallocated array or a memory-mapped cache file (``ernie_vl.data.image_cache``),
  so neither memory nor open file handles grow per item. Videos keep
  one deterministic view (segment-centre frames, centre crop), so there is no per-step
  decoding at all. Unreadable files (and empty captions) are dropped once, counted and listed.
* streaming (``PairDataset`` / ``VideoDataset`` through ``ernie_vl.data.mixing``):
  for data larger than the cache budget; decoded per step in workers.

Texts are tokenised once: captions to (N, L) int64, class prompts to one (P_c, L)
tensor per class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ernie_vl.data.synthetic import load_prompts


def video_dataset(path: str | Path, num_frames: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                  train: bool, classes: Optional[Sequence[str]] = None):
    """``video.VideoFolder`` (a folder) or ``video.VideoCSV`` (a .csv) with the model's clip transform.

    Training streams use TSN sampling (random offsets; otherwise the segment centres) and random resized
    crops but no flips here: a flip
    changes the label of direction-sensitive actions (move left / right), so flips and
    reversals happen per batch, relabelled through declared maps (``clip_augment``).
    """
    from video.transforms import ClipTransform, ClipTransformConfig

    transform = ClipTransform(ClipTransformConfig(image_size=image_size, mean=tuple(mean), std=tuple(std),
                                                  flip_prob=0.0), train=train)
    path = Path(path)
    # evaluation takes each of T equal segments' centre frame (TSN test mode, the CLI's default): the frames a
    # training clip without temporal jitter takes from a cache of 2T (``clip_mixing.temporal_indices``); the
    # first-to-last linspace ("uniform") steps unevenly (16 -> 8: 0, 2, 4, 6, 9, 11, 13, 15)
    sampling = "tsn"
    kwargs = dict(num_frames=num_frames, sampling=sampling, train=train, transform=transform, classes=classes,
                  isolation="inline")
    if path.is_dir():
        from video import VideoFolder

        return VideoFolder(path, **kwargs)
    if path.is_file() and path.suffix.lower() == ".csv":
        from video import VideoCSV

        return VideoCSV(path, **kwargs)
    raise ValueError(f"videos {str(path)!r} must be a folder ROOT/<class>/<file> or a CSV with path,label columns")


def class_prompts(classes: Sequence[str], video_roots: Sequence[str | Path], template: str) -> dict[str, list[str]]:
    """Class -> prompts: from ``prompts.json`` beside the videos when present, else ``template`` of the name."""
    found: dict[str, list[str]] = {}
    for root in video_roots:
        folder = Path(root) if Path(root).is_dir() else Path(root).parent
        found.update(load_prompts(folder) or {})
    return {c: found.get(c) or [template.format(c.replace("_", " "))] for c in classes}


def tokenize(tokenizer: Callable, texts: Sequence[str], chunk: int = 4096) -> torch.Tensor:
    """(N, L') int64 tokens of ``texts``, trailing all-padding columns cut off.

    L' is the longest tokenised text, so short captions do not pay for the full context
    length in every step (text pools at the end-of-text token, which is kept).
    """
    parts = [torch.as_tensor(tokenizer(list(texts[i:i + chunk]))) for i in range(0, len(texts), chunk)]
    tokens = torch.cat(parts).long()
    used = (tokens != 0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else tokens.shape[1]
    return tokens[:, :length].contiguous()


def estimate_bytes(count: int, frames: int, image_size: int) -> int:
    """uint8 bytes of ``count`` items of ``frames`` x 3 x S x S pixels."""
    return count * frames * 3 * image_size * image_size


@dataclass
class Normaliser:
    """uint8 <-> normalised float with per-channel mean/std (channel axis ``-3``)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x * std + mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)

    def to_float(self, u8: torch.Tensor) -> torch.Tensor:
        scale = (1.0 / (255.0 * torch.tensor(self.std))).view(3, 1, 1)
        shift = (-torch.tensor(self.mean) / torch.tensor(self.std)).view(3, 1, 1)
        return torch.addcmul(shift, u8.float(), scale)


@dataclass
class Failures:
    count: int = 0
    files: list[tuple[str, str]] = field(default_factory=list)


def _decode_all(dataset: Dataset, num_workers: int, desc: str, progress: bool,
                convert: Callable[[Any], Any]) -> tuple[list[int], list[Any]]:
    """Run ``dataset`` once through a DataLoader; returns the kept indices and ``convert(item)`` (None dropped).

    Each item is converted (a fresh uint8 copy) as soon as it arrives, so the worker's shared-memory
    tensor, and its file descriptor, is released at once: open handles stay bounded by the prefetch.
    """
    from tqdm import tqdm

    loader = DataLoader(_WithIndex(dataset), batch_size=32, num_workers=num_workers, collate_fn=list,
                        persistent_workers=False)
    keep, items = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        for index, item in batch:
            if item is not None:
                keep.append(index)
                items.append(convert(item))
        del batch
    return keep, items


class _WithIndex(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class CachedPairs:
    """Image-text pairs decoded once: ``images`` uint8 (N,3,S,S) (RAM or a memory-mapped cache file),
    ``tokens`` (N,L), ``captions``, ``paths``; ``failures`` lists unreadable images and empty captions.

    ``csv_paths`` are ``filepath,caption`` CSVs (see ``ernie_vl.data.pairs.PairList``), one
    ``PairList`` already read, or WebDataset shard specs (``ernie_vl.data.shards``; decoded into RAM). See ``ernie_vl.data.image_cache`` for the cache and its key.
    """

    def __init__(self, csv_paths: Sequence[str | Path] | Any, preprocess: Callable, tokenizer: Callable,
                 image_col: str = "filepath", caption_col: str = "caption", num_workers: int = 2,
                 progress: bool = True, cache_dir: Optional[str | Path] = None) -> None:
        from ernie_vl.data.image_cache import decode_images
        from ernie_vl.data.pairs import PairList
        from ernie_vl.data.shards import is_shard_spec

        self.norm = Normaliser(tuple(preprocess.mean), tuple(preprocess.std))
        if not isinstance(csv_paths, PairList) and csv_paths and all(is_shard_spec(str(p)) for p in csv_paths):
            from ernie_vl.data.shard_stream import decode_shards

            self._pixels, self.captions, self.paths, skipped = decode_shards(list(map(str, csv_paths)), preprocess,
                                                                             num_workers, progress)
            self._rows = torch.arange(len(self.captions))
            self.cache_file = None
            self.failures = Failures(len(skipped), list(skipped))
            self.tokens = tokenize(tokenizer, self.captions)
            return
        listed = csv_paths if isinstance(csv_paths, PairList) else PairList.from_csvs(csv_paths, image_col, caption_col)
        decoded = decode_images(listed.paths, preprocess, cache_dir, [listed.digest], num_workers, progress)
        if not len(decoded.rows):
            raise ValueError(f"no readable images in {listed.sources}")
        self.cache_file = decoded.cache_file
        self._pixels, self._rows = decoded.pixels, decoded.rows
        keep = decoded.rows.tolist()
        self.captions = [listed.captions[i] for i in keep]
        self.paths = [listed.paths[i] for i in keep]
        self.failures = Failures(0, list(listed.skipped) + [(listed.paths[r], why) for r, why in decoded.failed])
        self.failures.count = len(self.failures.files)
        self.tokens = tokenize(tokenizer, self.captions)

    @property
    def images(self) -> torch.Tensor:
        """(N,3,S,S) uint8 of the kept pairs (a copy when some rows failed; use :meth:`batch` in loops)."""
        if len(self._rows) == len(self._pixels):
            return self._pixels
        return self._pixels[self._rows]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B,3,S,S) float32, tokens (B,L) int64)."""
        return self.norm.to_float(self._pixels[self._rows[ids]]), self.tokens[ids]


class CachedVideos:
    """Labelled clips held in memory: ``clips`` uint8 (N,T,3,S,S), ``labels`` (N,), per-class prompt tokens."""

    def __init__(self, roots: Sequence[str | Path], num_frames: int, image_size: int, mean: Sequence[float],
                 std: Sequence[float], tokenizer: Callable, prompt_template: str = "a video of {}",
                 classes: Optional[Sequence[str]] = None, num_workers: int = 2, progress: bool = True,
                 cache_dir: Optional[str | Path] = None) -> None:
        datasets = [video_dataset(r, num_frames, image_size, mean, std, train=False, classes=classes) for r in roots]
        self.classes = list(classes) if classes is not None else list(datasets[0].classes)
        for root, ds in zip(roots, datasets):
            if list(ds.classes) != self.classes:
                raise ValueError(f"videos {str(root)!r} have classes {ds.classes[:10]}, expected {self.classes[:10]}")
        self.norm = Normaliser(tuple(mean), tuple(std))
        dataset = ConcatDataset(datasets)
        all_paths = [p for ds in datasets for p, _ in ds.samples]
        def decode() -> dict:
            keep, items = _decode_all(dataset, num_workers, "decoding videos", progress,
                                      lambda item: (self.norm.to_uint8(item[0]), int(item[1])))
            if not items:
                raise ValueError(f"no decodable videos in {[str(r) for r in roots]}")
            return {"keep": keep, "clips": torch.stack([clip for clip, _ in items]),
                    "labels": torch.tensor([label for _, label in items], dtype=torch.int64)}

        from ernie_vl.data.clip_cache import cached_clips
        from ernie_vl.data.image_cache import file_stamps

        key = ["videos", num_frames, image_size, list(mean), list(std), self.classes, file_stamps(all_paths)]
        decoded = cached_clips(cache_dir, key, decode)
        keep, self.clips, self.labels = torch.as_tensor(decoded["keep"]).tolist(), decoded["clips"], decoded["labels"]
        self.paths = [all_paths[i] for i in keep]
        dropped = sorted(set(range(len(all_paths))) - set(keep))
        self.failures = Failures(len(dropped), [(all_paths[i], "undecodable video") for i in dropped])
        self.prompts = class_prompts(self.classes, roots, prompt_template)
        # one tokenisation of all prompts, so every class's (P_c, L) has the same L
        flat = tokenize(tokenizer, [p for c in self.classes for p in self.prompts[c]])
        self.prompt_tokens = list(flat.split([len(self.prompts[c]) for c in self.classes]))

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, ids: torch.Tensor, generator: Optional[torch.Generator] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clips (B,T,3,S,S) float32, labels (B,), prompt tokens (B,L): one prompt of each clip's class)."""
        labels = self.labels[ids]
        return self.norm.to_float(self.clips[ids]), labels, pick_prompts(self.prompt_tokens, labels, generator)


def pick_prompts(prompt_tokens: list[torch.Tensor], labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, L) tokens: for each label one of its class's prompts (random with ``generator``, else the first)."""
    rows = []
    for label in labels.tolist():
        options = prompt_tokens[label]
        pick = int(torch.randint(len(options), (1,), generator=generator)) if generator is not None and len(options) > 1 else 0
        rows.append(options[pick])
    return torch.stack(rows)


def cpu_workers(requested: int) -> int:
    """Worker processes to use: ``requested`` capped by the CPUs this process may run on."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(0, min(requested, available))
