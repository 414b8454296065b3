"""Multi-view testing: ``num_clips`` temporal views x ``num_crops`` spatial crops per video, scores averaged.

X-CLIP and most Kinetics results report 4x3 (4 clips, 3 crops). A video is
decoded once for all its temporal views (one request to the decode worker).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from video.errors import VideoDecodeError
from video.transforms import ClipTransform

AVERAGES = ("prob", "logits")


@dataclass(frozen=True)
class ViewSpec:
    """``num_clips`` temporal x ``num_crops`` spatial views; ``average`` "prob" (softmax) or "logits"."""

    num_clips: int = 1
    num_crops: int = 1
    average: str = "prob"

    def __post_init__(self) -> None:
        if not isinstance(self.num_clips, int) or self.num_clips < 1:
            raise ValueError(f"num_clips must be a positive int, got {self.num_clips!r}")
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre) or 3 (three crops), got {self.num_crops!r}")
        if self.average not in AVERAGES:
            raise ValueError(f"average {self.average!r} is not one of: {', '.join(AVERAGES)}")

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def __str__(self) -> str:
        return f"{self.num_clips}x{self.num_crops}"


def parse_views(text: str | ViewSpec) -> ViewSpec:
    """"4x3" -> ViewSpec(4, 3); "1" -> ViewSpec(1, 1)."""
    if isinstance(text, ViewSpec):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX\u00d7]\s*(\d+))?\s*", str(text))
    if not match:
        raise ValueError(f"views {text!r} must look like CLIPSxCROPS, e.g. 1x1, 4x3")
    return ViewSpec(int(match.group(1)), int(match.group(2) or 1))


def average_views(logits: torch.Tensor, average: str = "prob") -> torch.Tensor:
    """(B,V,C) per-view logits -> (B,C): mean of softmax ("prob", returned as log-probabilities) or of logits."""
    if logits.dim() != 3:
        raise ValueError(f"expected (B,V,C) logits, got shape {tuple(logits.shape)}")
    if average == "prob":
        return logits.float().softmax(-1).mean(1).clamp_min(1e-12).log()
    if average == "logits":
        return logits.float().mean(1)
    raise ValueError(f"average {average!r} is not one of: {', '.join(AVERAGES)}")


class MultiViewDataset(Dataset):
    """Wraps a video dataset (its ``samples``, sampler settings and eval transform).

    Item: ``(views (V,T,3,S,S) float32, label int, index int)``, index into ``samples``.

    Views are ordered clip-major: view ``c * num_crops + k`` is temporal clip c, crop k.
    A file that fails gives None and is recorded in the wrapped dataset's ``failures``.
    """

    def __init__(self, dataset, views: ViewSpec | str = ViewSpec()) -> None:
        self.dataset = dataset
        self.views = parse_views(views)
        if dataset.train:
            raise ValueError("multi-view testing needs a dataset built with train=False")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    def load_views(self, index: int) -> torch.Tensor:
        ds = self.dataset
        path, _ = ds.samples[index]
        generator = torch.Generator().manual_seed(ds.seed * 1_000_003 + index)
        n = self.views.num_clips
        with ds.open(path) as reader:
            per_clip = [ds.sampler(len(reader), fps=reader.fps, generator=generator, view=v, num_views=n).indices
                        for v in range(n)]
            wanted = torch.unique(torch.cat(per_clip))  # every clip's frames in one decode request
            frames = reader.get_frames(wanted)
            concealed = list(reader.last_concealed)
        position = {int(i): k for k, i in enumerate(wanted.tolist())}
        out = []
        for indices in per_clip:
            clip_frames = frames[[position[int(i)] for i in indices.tolist()]]
            for crop in range(self.views.num_crops):
                if isinstance(ds.transform, ClipTransform):
                    out.append(ds.transform(clip_frames, crop_index=crop, num_crops=self.views.num_crops))
                else:
                    out.append(ds.transform(clip_frames))
        ds.note_concealed(path, concealed)
        return torch.stack(out).float()

    def __getitem__(self, index: int):
        path, label = self.dataset.samples[index]
        try:
            return self.load_views(index), int(label), index
        except (VideoDecodeError, OSError, RuntimeError, ValueError) as err:
            reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
            self.dataset.failure_log.record(path, reason)
            return None
