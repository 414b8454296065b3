"""Zero-shot video classification: class names -> prompts -> text embeddings -> cosine with video embeddings.

Works with any model that has ``encode_video(clips (B,T,3,H,W)) -> (B,D)`` and
``encode_text(tokens) -> (B,D)``, and a tokenizer (strings -> token tensor).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a video of {label}.",
    "a video of a person {label}.",
    "a clip of {label}.",
    "footage of {label}.",
)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise ValueError("at least one prompt template is needed, e.g. 'a video of {label}.'")
    for t in templates:
        if not isinstance(t, str) or "{label}" not in t:
            raise ValueError(f"prompt template {t!r} must be a string containing '{{label}}'")
    return templates


class ZeroShotClassifier(nn.Module):
    """``classify_video(clips (B,T,3,H,W)) -> (B,C)`` logits = scale * cos(video, class text embedding).

    Each class embedding is the normalised mean of its normalised template embeddings.
    ``logit_scale`` defaults to ``model.logit_scale.exp()`` when the model has one, else 100.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, logit_scale: float | None = None,
                 batch_size: int = 256) -> None:
        super().__init__()
        for attr in ("encode_video", "encode_text"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"zero-shot needs a model with {attr}(); {type(model).__name__} has none")
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise ValueError("zero-shot needs at least one class name")
        self.templates = check_templates(templates)
        self.model = model
        if logit_scale is None:
            scale = getattr(model, "logit_scale", None)
            logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.logit_scale = float(logit_scale)
        self.register_buffer("text_embeddings", self._embed_classes(tokenizer, batch_size), persistent=False)

    @torch.no_grad()
    def _embed_classes(self, tokenizer: Callable, batch_size: int) -> torch.Tensor:
        prompts = [t.format(label=name) for name in self.class_names for t in self.templates]
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size])
            chunks.append(F.normalize(self.model.encode_text(tokens.to(device)).float(), dim=-1))
        per_prompt = torch.cat(chunks).view(len(self.class_names), len(self.templates), -1)
        return F.normalize(per_prompt.mean(1), dim=-1)  # (C, D)

    def classify_video(self, clips: torch.Tensor) -> torch.Tensor:
        video = F.normalize(self.model.encode_video(clips).float(), dim=-1)
        return self.logit_scale * video @ self.text_embeddings.to(video.device).t()

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.classify_video(clips)


class FrameMeanVideoModel(nn.Module):
    """Gives an image-text model (open_clip, ...) ``encode_video``: the mean of its per-frame image embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(model, "encode_image", None)):
            raise TypeError(f"{type(model).__name__} has neither encode_video nor encode_image")
        self.model = model
        if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
            self.logit_scale = model.logit_scale

    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:
        b, t = clips.shape[:2]
        frames = F.normalize(self.model.encode_image(clips.flatten(0, 1)).float(), dim=-1)
        return F.normalize(frames.view(b, t, -1).mean(1), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def as_video_text_model(model: nn.Module) -> nn.Module:
    """``model`` itself when it has ``encode_video``, else a :class:`FrameMeanVideoModel` around it."""
    return model if callable(getattr(model, "encode_video", None)) else FrameMeanVideoModel(model)
