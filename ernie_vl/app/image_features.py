"""Which image features a linear probe reads: the final embedding or the pooled features before the projection.

CLIP_benchmark probes ``model.encode_image`` (the L2-normalised embedding; our default); the CLIP
paper probes the features before the projection to the embedding space ("pooled" here: for an
``ErnieVL``, the pooled backbone output that enters ``visual_head``). ``ImageFeatures(model, kind)``
is a stand-in with the model's interface whose ``encode_image`` gives the chosen kind, so the
batch embedding code (``retrieval.embed``) runs unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

FEATURE_KINDS: tuple[str, ...] = ("embedding", "pooled")


def check_features(kind: str, model: Any = None) -> str:
    """``kind`` when it is known (and ``model`` can give it); ValueError naming the valid kinds otherwise."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown image features {kind!r}; valid: {', '.join(FEATURE_KINDS)}")
    if kind == "pooled" and model is not None and not hasattr(model, "visual_head"):
        raise ValueError(f"features 'pooled' need an ErnieVL model (its visual_head); {type(model).__name__} "
                         f"gives only 'embedding'")
    return kind


class ImageFeatures:
    """``encode_image(images (B,3,H,W)) -> (B,D)`` of the chosen ``kind``; every other attribute is the model's."""

    def __init__(self, model: Any, kind: str = "embedding") -> None:
        self.model = model
        self.kind = check_features(kind, model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    @property
    def normalized(self) -> bool:
        """Whether ``encode_image`` is meant to be L2-normalised (the embedding) or used as is (pooled)."""
        return self.kind == "embedding"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return self.model.encode_image(images)
        seen: list[torch.Tensor] = []
        hook = self.model.visual_head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
        try:
            self.model.image_features(images, routing=False)
        finally:
            hook.remove()
        return seen[-1]
