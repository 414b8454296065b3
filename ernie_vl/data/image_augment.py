"""Training-time image augmentation on the step's float batch: random resized crops and small rotations.

Image-text training decodes each image once (``ernie_vl.data.sources``) or streams it through the
model's eval transform, so without this every step sees the same pixels of an image. open_clip
trains with ``RandomResizedCrop(scale=(0.9, 1.0))``; :class:`ImageAugmenter` does the same on the
batch already in memory (one ``grid_sample``, no per-image PIL work): per image a crop covering
``crop_min_area``..1 of the frame (aspect 3/4..4/3, inside the frame), turned by a uniform angle in
``[-rotate_degrees, rotate_degrees]``, resized back to the input size.

The random choices are drawn for the *global* batch from one generator that every rank seeds
alike, and each rank applies its slice, so ranks stay in step and a resume (``state_dict``)
continues exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from video.clip_mixing import crop_resize, random_crop_boxes


@dataclass(frozen=True)
class ImageAugmentConfig:
    """``crop_min_area`` in (0, 1] (1: no crops; open_clip's 0.9); ``rotate_degrees`` in [0, 180) (0: none)."""

    crop_min_area: float = 1.0
    rotate_degrees: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_min_area <= 1.0:
            raise ValueError(f"image crop_min_area (--image-crop-min-area) must be in (0, 1] (1 = no crops), got "
                             f"{self.crop_min_area!r}")
        if not 0.0 <= self.rotate_degrees < 180.0:
            raise ValueError(f"image rotate_degrees (--image-rotate) must be in [0, 180) (0 = none), got "
                             f"{self.rotate_degrees!r}")

    @property
    def enabled(self) -> bool:
        return self.crop_min_area < 1.0 or self.rotate_degrees > 0.0


class ImageAugmenter:
    """``augmenter(images (B_local,C,H,W), global_batch, rank) -> (B_local,C,H,W)``; see the module docstring."""

    def __init__(self, cfg: ImageAugmentConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(int(seed) + 611_953)

    def __call__(self, images: torch.Tensor, global_batch: int | None = None, rank: int = 0) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) float batch, got shape {tuple(images.shape)}")
        local = images.shape[0]
        total = local if global_batch is None else int(global_batch)
        if total < local * (rank + 1):
            raise ValueError(f"global batch {total} is smaller than rank {rank}'s slice end {local * (rank + 1)}")
        if self.cfg.crop_min_area < 1.0:
            boxes = random_crop_boxes(total, self.cfg.crop_min_area, self.generator)
        else:  # the whole frame (a drawn box of area 1 with an aspect other than 1 would not be)
            boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand(total, 4)
        angles = (torch.rand(total, generator=self.generator, dtype=torch.float64) * 2 - 1) * math.radians(
            self.cfg.rotate_degrees)
        part = slice(rank * local, (rank + 1) * local)
        out = crop_resize(images[:, None].float(), boxes[part], angles[part] if self.cfg.rotate_degrees else None)
        return out[:, 0].to(images.dtype)

    def summary(self) -> dict[str, Any]:
        """What this augmentation does, for the run log."""
        return {"crop_area": [self.cfg.crop_min_area, 1.0] if self.cfg.crop_min_area < 1 else "off",
                "rotate_degrees": self.cfg.rotate_degrees or "off"}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
