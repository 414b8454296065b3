"""Helpers for the ErnieVL model tests: tiny batches built from a model's own config."""
from __future__ import annotations

import torch

from ernie_vl.model import ErnieVL, ErnieVLBatch

CAPTIONS = ["a small red circle", "a large blue square left of a green triangle", "two dogs", "a cat on a mat"]


def make_batch(model: ErnieVL, pairs: int = 3, videos: int = 2, frames: int | None = None,
               labels: bool = True, video_texts: bool = True, seed: int = 0) -> ErnieVLBatch:
    """Random pixels at the model's sizes, real tokenized captions, labels in range."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    size = cfg.image_encoder.image_size[0]
    vsize = cfg.video_encoder.image_size[0]
    t = frames or cfg.video_encoder.num_frames
    batch = ErnieVLBatch()
    if pairs:
        batch.images = torch.randn(pairs, 3, size, size, generator=g)
        batch.texts = model.tokenizer([CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(pairs)])
    if videos:
        batch.videos = torch.randn(videos, t, 3, vsize, vsize, generator=g)
        if labels:
            batch.video_labels = torch.arange(videos) % cfg.num_classes
        if video_texts:
            batch.video_texts = model.tokenizer([f"a clip of motion {i}" for i in range(videos)])
    return batch


def parameters_without_grad(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters whose .grad is None or all zero."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
