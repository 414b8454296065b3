"""The per-step mix of sources: how many image-text pairs and clips each step draws, and from where.

Each (micro-)step draws a *global* batch of pair ids and of video ids from their
samplers (identical on every rank), keeps this rank's contiguous slice, and
builds one ``ErnieVLBatch`` with images + captions, clips + labels, and (when
``video_text``) one class prompt per clip for the video-text contrastive loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ernie_vl.data.sources import pick_prompts


@dataclass(frozen=True)
class StepMix:
    """Global samples per micro-step of each kind, and the split into ranks."""

    pairs: int
    videos: int
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("pairs", "videos"):
            value = getattr(self, name)
            if value < 0 or value % self.world_size:
                raise ValueError(f"{name} per micro-step ({value}) must be >= 0 and divisible by the "
                                 f"world size {self.world_size}")

    @classmethod
    def from_global(cls, batch_pairs: int, batch_videos: int, grad_accum: int, world_size: int) -> "StepMix":
        """Split global batches per optimiser step into ``grad_accum`` micro-steps."""
        for name, value in (("batch_pairs", batch_pairs), ("batch_videos", batch_videos)):
            if value % (grad_accum * world_size):
                raise ValueError(f"{name}={value} must be divisible by grad_accum x world size = "
                                 f"{grad_accum} x {world_size}")
        return cls(batch_pairs // grad_accum, batch_videos // grad_accum, world_size)


@dataclass
class DrawnStep:
    """One micro-step: this rank's batch, and the global ids drawn (for the priority update)."""

    batch: Any
    pair_ids: Optional[torch.Tensor]
    video_ids: Optional[torch.Tensor]

    @property
    def num_samples(self) -> int:
        return sum(len(x) for x in (self.pair_ids, self.video_ids) if x is not None)


class MixedSource:
    """Builds micro-step batches from in-memory pair and video sources and their samplers."""

    def __init__(self, mix: StepMix, rank: int, pairs: Any = None, videos: Any = None, pair_sampler: Any = None,
                 video_sampler: Any = None, video_text: bool = True, seed: int = 0, augmenter: Any = None) -> None:
        self.mix, self.rank = mix, rank
        self.pairs, self.videos = (pairs if mix.pairs else None), (videos if mix.videos else None)
        self.pair_sampler, self.video_sampler = pair_sampler, video_sampler
        self.video_text = video_text
        self.prompt_generator = torch.Generator().manual_seed(seed + 7919)
        self.augmenter = augmenter  # ernie_vl.data.clip_augment.ClipAugmenter or None

    def _local(self, ids: torch.Tensor, per_rank: int) -> torch.Tensor:
        return ids[self.rank * per_rank:(self.rank + 1) * per_rank]

    def next(self) -> DrawnStep:
        from ernie_vl.model import ErnieVLBatch

        fields: dict[str, Any] = {}
        pair_ids = video_ids = None
        if self.pairs is not None:
            pair_ids = self.pair_sampler.sample_global(self.mix.pairs)
            images, texts = self.pairs.batch(self._local(pair_ids, self.mix.pairs // self.mix.world_size))
            fields.update(images=images, texts=texts)
        if self.videos is not None:
            video_ids = self.video_sampler.sample_global(self.mix.videos)
            per_rank = self.mix.videos // self.mix.world_size
            local = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
            labels = self.videos.labels[video_ids]
            clips = self.videos.clips[video_ids[local]]
            if self.augmenter is not None:  # choices for the global batch, pixels for this rank's slice
                draw = self.augmenter.draw(labels, clips.shape[1])
                labels, clips = draw.labels, self.augmenter.pixels(clips, draw, local)
            floats = self.videos.norm.to_float(clips)
            if self.augmenter is not None:
                floats = self.augmenter.spatial(floats, draw, local)
            texts = None
            if self.video_text:
                # prompts are drawn for the whole global batch so every rank's generator stays in step
                texts = pick_prompts(self.videos.prompt_tokens, labels, self.prompt_generator)[local]
            fields.update(augmented_video_fields(self.augmenter, floats, labels[local],
                                                 texts))
        return DrawnStep(ErnieVLBatch(**fields), pair_ids, video_ids)

    def state_dict(self) -> dict[str, Any]:
        return source_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_source_state(self, state)


def augmented_video_fields(augmenter: Any, clips: torch.Tensor, labels: torch.Tensor,
                           texts: Optional[torch.Tensor]) -> dict[str, Any]:
    """``ErnieVLBatch`` video fields after mixup / cutmix (when the augmenter mixes): soft targets, and
    each mixed clip's text taken from the clip with the larger share."""
    swapped = False
    if augmenter is not None:
        clips, labels, swapped = augmenter.mix(clips, labels)
    fields: dict[str, Any] = {"videos": clips, "video_labels": labels}
    if texts is not None:
        fields["video_texts"] = texts.flip(0) if swapped else texts
    return fields


def source_state(source: Any) -> dict[str, Any]:
    """The resumable state of a step source: its prompt generator, its samplers and its clip augmenter."""
    state: dict[str, Any] = {"prompt_generator": source.prompt_generator.get_state()}
    if getattr(source, "augmenter", None) is not None:
        state["augmenter"] = source.augmenter.state_dict()
    if source.pair_sampler is not None:
        state["pair_sampler"] = source.pair_sampler.state_dict()
    if source.video_sampler is not None:
        state["video_sampler"] = source.video_sampler.state_dict()
    return state


def load_source_state(source: Any, state: dict[str, Any]) -> None:
    """Inverse of :func:`source_state`."""
    source.prompt_generator.set_state(state["prompt_generator"])
    if getattr(source, "augmenter", None) is not None and "augmenter" in state:
        source.augmenter.load_state_dict(state["augmenter"])
    if source.pair_sampler is not None:
        source.pair_sampler.load_state_dict(state["pair_sampler"])
    if source.video_sampler is not None:
        source.video_sampler.load_state_dict(state["video_sampler"])
