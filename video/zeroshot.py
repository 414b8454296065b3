"""Zero-shot video classification: class names -> prompts -> text embeddings -> cosine with video embeddings.

Works with any model that has ``encode_video(clips (B,T,3,H,W)) -> (B,D)`` and
``encode_text(tokens) -> (B,D)``, and a tokenizer (strings -> token tensor).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

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


def check_class_prompts(class_prompts: Mapping[str, Sequence[str]], class_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Per-class prompt lists, checked: keys must be class names, each list non-empty strings."""
    if not isinstance(class_prompts, Mapping):
        raise TypeError(f"class_prompts must be a dict class name -> list of prompts, got {type(class_prompts).__name__}")
    unknown = sorted(set(map(str, class_prompts)) - set(class_names))
    if unknown:
        raise ValueError(f"class_prompts names classes {unknown[:5]} that are not among the classes: {list(class_names)[:10]}")
    out = {}
    for name, prompts in class_prompts.items():
        prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"class_prompts[{name!r}] must be a non-empty list of non-empty strings, got {prompts!r}")
        out[str(name)] = prompts
    return out


class ZeroShotClassifier(nn.Module):
    """``classify_video(clips (B,T,3,H,W)) -> (B,C)`` logits = scale * cos(video, class text embedding).

    Prompts of a class: ``class_prompts[name]`` when given (a dict class name ->
    list of prompts, e.g. CLIP's hand-written ensembles), else every template
    filled with the name. Each class embedding is the normalised mean of its
    normalised prompt embeddings (prompt ensembling); classes may have different
    numbers of prompts. ``logit_scale`` defaults to ``model.logit_scale.exp()``
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
        if not self.class_names:
            raise ValueError("zero-shot needs at least one class name")
        self.class_prompts = check_class_prompts(class_prompts or {}, self.class_names)
        if len(self.class_prompts) < len(set(self.class_names)):
            self.templates = check_templates(templates)  # some class takes its prompts from the templates
        else:
            self.templates = tuple(templates)
        self.model = model
        if logit_scale is None:
            scale = getattr(model, "logit_scale", None)
            logit_scale = float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0
        self.logit_scale = float(logit_scale)
        self.register_buffer("text_embeddings", self._embed_classes(tokenizer, batch_size), persistent=False)

    def prompts_for(self, name: str) -> tuple[str, ...]:
        """The prompts whose embeddings are averaged for class ``name``."""
        if name in self.class_prompts:
            return self.class_prompts[name]
        return tuple(t.format(label=name) for t in self.templates)

    @torch.no_grad()
    def _embed_classes(self, tokenizer: Callable, batch_size: int) -> torch.Tensor:
        per_class = [self.prompts_for(name) for name in self.class_names]
        prompts = [p for group in per_class for p in group]
        owner = torch.repeat_interleave(torch.arange(len(per_class)), torch.tensor([len(g) for g in per_class]))
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size])
            chunks.append(F.normalize(self.model.encode_text(tokens.to(device)).float(), dim=-1))
        per_prompt = torch.cat(chunks)  # (P, D)
        sums = per_prompt.new_zeros(len(per_class), per_prompt.shape[1]).index_add_(0, owner.to(per_prompt.device), per_prompt)
        counts = torch.tensor([len(g) for g in per_class], dtype=per_prompt.dtype, device=per_prompt.device)
        return F.normalize(sums / counts[:, None], dim=-1)  # (C, D)

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
