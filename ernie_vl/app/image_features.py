"""Which image features a linear probe reads: the final embedding, the pooled features before the projection,
the image encoder's patch tokens, or every layer of the image path.

CLIP_benchmark probes ``model.encode_image`` (the L2-normalised embedding; our default); the CLIP
paper probes the features before the projection to the embedding space ("pooled" here: for an
``ErnieVL``, the pooled backbone output that enters ``visual_head``). Contrastive training on few
distinct captions pulls the final features of each caption together, so earlier layers keep more of
what a probe can use: ``tokens`` is the mean of the image encoder's patch tokens (timm's average
pooling of a ViT), ``layers`` concatenates that with the mean of the image's tokens after the
alignment projector and after every shared-backbone block (multi-layer linear evaluation, as in
iGPT and DINO). ``ImageFeatures(model, kind)`` is a stand-in with the model's interface whose
``encode_image`` gives the chosen kind, so the batch embedding code (``retrieval.embed``) runs
unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

FEATURE_KINDS: tuple[str, ...] = ("embedding", "pooled", "tokens", "layers")


def check_features(kind: str, model: Any = None) -> str:
    """``kind`` when it is known (and ``model`` can give it); ValueError naming the valid kinds otherwise."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown image features {kind!r}; valid: {', '.join(FEATURE_KINDS)}")
    if kind != "embedding" and model is not None and not hasattr(model, "visual_head"):
        raise ValueError(f"features {kind!r} need an ErnieVL model (its visual_head); {type(model).__name__} "
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
        """Whether ``encode_image`` is meant to be L2-normalised (the embedding) or used as is (the others)."""
        return self.kind == "embedding"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,D): D is the embedding size (``embedding``), the backbone width (``pooled``), the
        image encoder's width (``tokens``), or encoder width + (1 + backbone depth) x backbone width (``layers``)."""
        if self.kind == "embedding":
            return self.model.encode_image(images)
        model, seen = self.model, []
        hooks = []
        if self.kind == "pooled":
            hooks.append(model.visual_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0])))
        else:
            hooks.append(model.image_encoder.register_forward_hook(
                lambda _m, _args, out: seen.append(out.patch_tokens.mean(1))))
        if self.kind == "layers":
            hooks.append(model.image_projector.register_forward_hook(lambda _m, _args, out: seen.append(out[0].mean(1))))
            hooks += [block.register_forward_hook(lambda _m, _args, out: seen.append(out[0].mean(1)))
                      for block in model.backbone.blocks]
        try:
            model.image_features(images, routing=False)
        finally:
            for hook in hooks:
                hook.remove()
        return seen[0] if len(seen) == 1 else torch.cat(seen, dim=1)
