"""Modality ids carried per token through the shared backbone."""
from __future__ import annotations

import torch

TEXT = 0
IMAGE = 1
VIDEO = 2
NUM_MODALITIES = 3
NAMES = ("text", "image", "video")


def is_visual(modality_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of visual (image or video) tokens, same shape as ``modality_ids``."""
    return modality_ids != TEXT
