"""Training-time clip augmentation for the step sources: label-aware flip / reversal, temporal and
frame-rate jitter, mixup / cutmix.

``ClipAugmenter.draw(global labels)`` makes every random choice of one micro-step for the
*global* batch from one generator that every rank seeds alike (so ranks stay in step and a
resume continues exactly); ``pixels`` then applies this rank's slice of the draw to its
clips, and ``mix`` blends the float batch. The label maps come from ``ROOT/augment.json``
and / or the ``--hflip-map`` / ``--reverse-map`` flags (``video.label_maps``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from video.clip_mixing import crop_resize, mix_clips, one_hot, random_crop_boxes, temporal_indices
from video.label_maps import LabelMaps, apply_plan, load_label_maps


@dataclass
class ClipAugmentConfig:
    """Settings of :class:`ClipAugmenter`.

    ``maps``: declared flip / reversal maps (None: no flips or reversals); ``p_hflip`` /
    ``p_reverse``: their probabilities. ``temporal_jitter``: TSN random offsets over the
    cached frames; ``speed_min`` < 1: frame-rate jitter (a random span of ``speed_min``..1 of
    the clip). ``crop_min_area`` < 1: a random resized crop per clip covering at least that share
    of the frame. ``mixup`` / ``cutmix``: Beta alphas (0 = off).
    """

    maps: Optional[LabelMaps] = None
    p_hflip: float = 0.5
    p_reverse: float = 0.5
    temporal_jitter: bool = False
    speed_min: float = 1.0
    crop_min_area: float = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def needs_extra_frames(self) -> bool:
        """Whether the in-memory clips should hold more frames than the model takes."""
        return self.temporal_jitter or self.speed_min < 1.0


@dataclass
class AugmentDraw:
    """One micro-step's choices for the global batch: masks (B,), new labels (B,), frame indices (B,T) or None."""

    flip: torch.Tensor
    reverse: torch.Tensor
    labels: torch.Tensor
    frames: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)


class ClipAugmenter:
    """See the module docstring. ``classes``: the class names; ``num_frames``: frames the model takes."""

    def __init__(self, cfg: ClipAugmentConfig, classes: Sequence[str], num_frames: int, seed: int = 0) -> None:
        if not 0.0 < cfg.speed_min <= 1.0:
            raise ValueError(f"speed_min must be in (0, 1], got {cfg.speed_min!r}")
        self.cfg = cfg
        self.classes = list(classes)
        self.num_frames = int(num_frames)
        self.maps = (cfg.maps or LabelMaps()).resolve(self.classes, cfg.p_hflip, cfg.p_reverse)
        self.generator = torch.Generator().manual_seed(int(seed) + 104_729)

    @property
    def mixing(self) -> bool:
        return self.cfg.mixup > 0 or self.cfg.cutmix > 0

    def draw(self, labels: torch.Tensor, available: int) -> AugmentDraw:
        """Choices for clips of ``labels`` (global batch) whose stored clips hold ``available`` frames."""
        flip, reverse, new = self.maps.plan(labels, self.generator)
        frames = None
        if available != self.num_frames or self.cfg.needs_extra_frames:
            frames = temporal_indices(available, self.num_frames, labels.shape[0], self.generator,
                                      jitter=self.cfg.temporal_jitter, speed=(self.cfg.speed_min, 1.0))
        boxes = None
        if self.cfg.crop_min_area < 1.0:
            boxes = random_crop_boxes(labels.shape[0], self.cfg.crop_min_area, self.generator)
        return AugmentDraw(flip, reverse, new, frames, boxes)

    def pixels(self, clips: torch.Tensor, draw: AugmentDraw, local: slice) -> torch.Tensor:
        """This rank's clips (B_local, T_stored, ...) with the draw's frames, flips and reversals applied."""
        if draw.frames is not None:
            idx = draw.frames[local]
            clips = clips[torch.arange(clips.shape[0])[:, None], idx]
        return apply_plan(clips, draw.flip[local], draw.reverse[local])

    def spatial(self, clips: torch.Tensor, draw: AugmentDraw, local: slice) -> torch.Tensor:
        """This rank's float clips with the draw's random resized crops (unchanged without crops)."""
        if draw.boxes is None:
            return clips
        return crop_resize(clips, draw.boxes[local])

    def mix(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Mixup / cutmix of a float batch -> (clips, soft targets (B,K), partner_dominant).

        Clip i is mixed with clip B-1-i; ``partner_dominant`` is True when the partner has the larger
        share (then clip i's text should be its partner's). Without mixing: (clips, labels, False)."""
        if not self.mixing:
            return clips, labels, False
        targets = one_hot(labels, len(self.classes))
        mixed, soft, lam = mix_clips(clips, targets, self.cfg.mixup, self.cfg.cutmix, self.generator)
        return mixed, soft, lam < 0.5

    def summary(self) -> dict[str, Any]:
        """What this augmentation does, for the run log."""
        cfg = self.cfg
        return {**self.maps.summary(), "temporal_jitter": cfg.temporal_jitter,
                "crop_min_area": cfg.crop_min_area if cfg.crop_min_area < 1 else "off",
                "speed_span": [cfg.speed_min, 1.0] if cfg.speed_min < 1 else "off",
                "mixup": cfg.mixup or "off", "cutmix": cfg.cutmix or "off"}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def declared_maps(video_roots: Sequence[str], flags: Optional[LabelMaps] = None) -> Optional[LabelMaps]:
    """The label maps of a run: ``augment.json`` beside the first video root that has one, then the flags'
    parts on top (a flag replaces the file's entry of the same kind). None when nothing is declared."""
    maps = None
    for root in video_roots:
        maps = load_label_maps(root)
        if maps is not None:
            break
    if flags is not None:
        maps = flags if maps is None else maps.merged(flags)
    return maps
