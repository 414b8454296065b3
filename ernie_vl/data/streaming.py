"""Streaming source for data larger than the in-memory cache budget: decoding in DataLoader workers.

Same contract as ``ernie_vl.data.mixing.MixedSource`` (``next() -> DrawnStep``,
``state_dict`` / ``load_state_dict``). The samplers run in the main process inside
the DataLoader's batch sampler, so each step's global ids are drawn exactly as in the
in-memory path; DataLoader workers decode this rank's slice (images with the model's
transform; videos with TSN sampling and random resized crops; flips, reversals and mixing only
as the ``augmenter`` declares). Captions and
class prompts are tokenised once up front. A file that fails to decode is replaced in
its batch by another item of the same batch (the batch keeps its size, which the
cross-rank feature gather needs) and gets no priority update.

Resume: the ids drawn ahead by prefetching are saved and replayed first, so the sample
order resumes exactly; the workers' augmentation randomness is not restored.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ernie_vl.data.mixing import DrawnStep, StepMix, augmented_video_fields, load_source_state, source_state
from ernie_vl.data.sources import Normaliser, class_prompts, pick_prompts, tokenize, video_dataset


class _Items(Dataset):
    """Key ``(kind, index)`` -> ``(kind, index, tensor or None, reason)``; kind 0 = image (uint8), 1 = clip."""

    def __init__(self, pairs: Optional[Dataset], videos: Optional[Dataset]) -> None:
        self.pairs, self.videos = pairs, videos

    def __len__(self) -> int:
        return (len(self.pairs) if self.pairs is not None else 0) + (len(self.videos) if self.videos is not None else 0)

    def __getitem__(self, key: tuple[int, int]):
        kind, index = key
        if kind == 0:
            _, pixels, reason = self.pairs[index]
            return kind, index, pixels, reason
        item = self.videos[index]
        return kind, index, None if item is None else item[0], None if item is not None else "undecodable video"


def _collate(items: list) -> dict:
    """Per kind: (ok mask (n,), the decoded tensors stacked (k,...) or None, [(index, reason)] failed).

    Stacking in the worker sends one shared-memory tensor per kind and step, not one per item.
    """
    out = {}
    for kind in (0, 1):
        chosen = [(i, x, why) for k, i, x, why in items if k == kind]
        if not chosen:
            continue
        good = [x for _, x, _ in chosen if x is not None]
        out[kind] = (torch.tensor([x is not None for _, x, _ in chosen]), torch.stack(good) if good else None,
                     [(i, why) for i, x, why in chosen if x is None])
    return out


class StreamingSource:
    """Per-step batches decoded by DataLoader workers; see the module docstring."""

    def __init__(self, mix: StepMix, rank: int, pair_csvs: list[str], video_roots: list[str], model: Any,
                 num_frames: int, video_size: int, pair_sampler_factory, video_sampler_factory,
                 video_text: bool = True, prompt_template: str = "a video of {}", image_col: str = "filepath",
                 caption_col: str = "caption", num_workers: int = 2, seed: int = 0, augmenter: Any = None) -> None:
        from torch.utils.data import ConcatDataset

        from ernie_vl.data.pairs import PairImages, PairList

        self.mix, self.rank, self.video_text = mix, rank, video_text
        self.num_frames = num_frames
        pairs = videos = None
        self.skipped: list[tuple[str, str]] = []  # (file, reason) not yet reported
        if pair_csvs and mix.pairs:
            listed = pair_csvs if isinstance(pair_csvs, PairList) else PairList.from_csvs(pair_csvs, image_col,
                                                                                           caption_col)
            self.pair_paths = listed.paths
            self.skipped += listed.skipped
            pairs = PairImages(listed.paths, model.preprocess)
            self.tokens = tokenize(model.tokenizer, listed.captions)
        if video_roots and mix.videos:
            parts = [video_dataset(r, num_frames, video_size, model.preprocess.mean, model.preprocess.std, train=True)
                     for r in video_roots]
            self.classes = list(parts[0].classes)
            self.video_paths = [p for part in parts for p, _ in part.samples]
            videos = ConcatDataset(parts)
            self.labels = torch.tensor([label for part in parts for _, label in part.samples], dtype=torch.int64)
            prompts = class_prompts(self.classes, video_roots, prompt_template)
            flat = tokenize(model.tokenizer, [p for c in self.classes for p in prompts[c]])
            self.prompt_tokens = list(flat.split([len(prompts[c]) for c in self.classes]))
        self.norm = Normaliser(tuple(model.preprocess.mean), tuple(model.preprocess.std))
        self.pair_sampler = pair_sampler_factory(len(pairs)) if pairs is not None else None
        self.video_sampler = video_sampler_factory(len(videos)) if videos is not None else None
        self.prompt_generator = torch.Generator().manual_seed(seed + 7919)
        self.augmenter = augmenter  # flips / reversals / mixing on the decoded batch (ClipAugmenter)
        self.pending: deque = deque()  # (pair_ids, video_ids, prompts) drawn, not yet trained on
        self.replay: deque = deque()
        self.loader = DataLoader(_Items(pairs, videos), batch_sampler=_StepKeys(self), num_workers=num_workers,
                                 collate_fn=_collate, persistent_workers=num_workers > 0)
        self._iter = None
        self.failures = 0

    def _draw(self) -> tuple:
        if self.replay:
            return self.replay.popleft()
        pair_ids = self.pair_sampler.sample_global(self.mix.pairs) if self.pair_sampler else None
        video_ids = self.video_sampler.sample_global(self.mix.videos) if self.video_sampler else None
        prompts = draw = None
        if video_ids is not None:
            labels = self.labels[video_ids]
            if self.augmenter is not None:
                drawn = self.augmenter.draw(labels, self.num_frames)
                labels = drawn.labels
                draw = (drawn.flip, drawn.reverse, drawn.labels, drawn.frames)  # plain tuple: saved with the state
            if self.video_text:
                prompts = pick_prompts(self.prompt_tokens, labels, self.prompt_generator)
        return pair_ids, video_ids, (prompts, draw)

    def _local(self, ids: torch.Tensor, total: int) -> slice:
        per_rank = total // self.mix.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def next(self) -> DrawnStep:
        from ernie_vl.model import ErnieVLBatch

        if self._iter is None:
            self._iter = iter(self.loader)
        items = next(self._iter)
        pair_ids, video_ids, prompts = self.pending.popleft()
        fields: dict[str, Any] = {}
        if pair_ids is not None:
            ids = pair_ids[self._local(pair_ids, self.mix.pairs)]
            images = self._fill(items[0], ids, self.pair_paths)
            fields.update(images=self.norm.to_float(images), texts=self.tokens[ids])
        if video_ids is not None:
            local = self._local(video_ids, self.mix.videos)
            clips = self._fill(items[1], video_ids[local], self.video_paths)
            prompts, draw = prompts
            labels = self.labels[video_ids]
            if draw is not None:
                from ernie_vl.data.clip_augment import AugmentDraw

                draw = AugmentDraw(*draw)
                labels, clips = draw.labels, self.augmenter.pixels(clips, draw, local)
            fields.update(augmented_video_fields(self.augmenter, clips, labels[local],
                                                 None if prompts is None else prompts[local]))
        return DrawnStep(ErnieVLBatch(**fields), pair_ids, video_ids)

    def _fill(self, part: tuple, ids: torch.Tensor, paths: list[str]) -> torch.Tensor:
        """The step's stacked tensors with each failed item replaced by the batch's first good one."""
        ok, stacked, failed = part
        if stacked is None:
            raise ValueError("every file of this step's batch failed to decode; check the data "
                             f"(e.g. {paths[int(ids[0])]!r}: {failed[0][1]})")
        self.failures += len(failed)
        self.skipped += [(paths[i], why) for i, why in failed]
        if not failed:
            return stacked
        position = torch.cumsum(ok.long(), 0) - 1
        return stacked[torch.where(ok, position, torch.zeros_like(position))]

    def take_skipped(self) -> list[tuple[str, str]]:
        """(file, reason) of the items skipped since the last call (for the run's log)."""
        out, self.skipped = self.skipped, []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**source_state(self), "pending": list(self.replay) + list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_source_state(self, state)
        self.replay = deque(state.get("pending", []))


class _StepKeys:
    """Batch sampler: each step's keys for this rank; records the draw as pending."""

    def __init__(self, source: StreamingSource) -> None:
        self.source = source

    def __iter__(self):
        src = self.source
        while True:
            pair_ids, video_ids, prompts = src._draw()
            src.pending.append((pair_ids, video_ids, prompts))
            keys = []
            if pair_ids is not None:
                keys += [(0, int(i)) for i in pair_ids[src._local(pair_ids, src.mix.pairs)]]
            if video_ids is not None:
                keys += [(1, int(i)) for i in video_ids[src._local(video_ids, src.mix.videos)]]
            yield keys

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**31
