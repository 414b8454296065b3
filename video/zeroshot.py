"""Zero-shot video classification: class names -> prompts -> text embeddings -> cosine with video embeddings.

Works with any model that has ``encode_video(clips (B,T,3,H,W)) -> (B,D)`` and
``encode_text(tokens) -> (B,D)``, and a tokenizer (strings -> token tensor).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from encoders.prompts import check_templates, class_prompt_lists, ensemble_text_embeddings  # noqa: F401 (re-export)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a video of {label}.",
    "a video of a person {label}.",
    "a clip of {label}.",
    "footage of {label}.",
)


class ZeroShotClassifier(nn.Module):
    """``classify_video(clips (B,T,3,H,W)) -> (B,C)`` logits = scale * cos(video, class text embedding).

    Prompts of a class: ``class_prompts[name]`` when given (a dict class name ->
    list of prompts, e.g. CLIP's hand-written ensembles), else every template
    filled with the name. Each class embedding is the normalised mean of its
    normalised prompt embeddings (``encoders.prompts``, the helper image zero-shot
    uses too); classes may have different numbers of prompts. ``logit_scale`` defaults to ``model.logit_scale.exp()``
    when the model has one, else 100.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, logit_scale: float | None = None,
                 batch_size: int = 256, class_prompts: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        for attr in ("encode_video", "encode_text"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(f"zero-shot needs a model with {attr}(); {type(model).__name__} has none")
        self.class_names = [str(c) for c in class_names]
        self.templates = tuple(templates)
        self.per_class = class_prompt_lists(self.class_names, self.templates, class_prompts)  # checked here
        self.model = model
        if logit_scale is None:
            scale = getattr(model, "logit_scale", None)
            logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.logit_scale = float(logit_scale)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        embeddings = ensemble_text_embeddings(model.encode_text, tokenizer, self.per_class, batch_size, device)
        self.register_buffer("text_embeddings", embeddings, persistent=False)

    def prompts_for(self, name: str) -> tuple[str, ...]:
        """The prompts whose embeddings are averaged for class ``name``."""
        return self.per_class[self.class_names.index(name)]

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
