"""Prompt ensembling for zero-shot classification (CLIP's recipe), shared by image and video zero-shot.

A class's text embedding is the L2-normalised mean of the L2-normalised text embeddings
of its prompts: every template filled with the class name, or a class's own prompt list.
Works with any ``encode_text(tokens (B,L)) -> (B,D)`` and a tokenizer ``list[str] -> (B,L)``.
Templates name the class as ``{label}``, ``{c}`` or ``{}`` (CLIP_benchmark's files use ``{c}``).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

PLACEHOLDERS = ("{label}", "{c}", "{}")
IMAGE_TEMPLATES: tuple[str, ...] = ("a photo of a {label}.", "a photo of the {label}.", "an image of a {label}.",
                                    "a picture of a {label}.")


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Templates as a tuple; each must be a string with one of :data:`PLACEHOLDERS`."""
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates:
        raise ValueError("at least one prompt template is needed, e.g. 'a photo of a {label}.'")
    for t in templates:
        if not isinstance(t, str) or not any(p in t for p in PLACEHOLDERS):
            raise ValueError(f"prompt template {t!r} must be a string containing one of {list(PLACEHOLDERS)}")
    return templates


def fill(template: str, label: str) -> str:
    """``template`` with its placeholder replaced by ``label``."""
    for p in PLACEHOLDERS:
        if p in template:
            return template.replace(p, label)
    raise ValueError(f"prompt template {template!r} has none of {list(PLACEHOLDERS)}")


def read_templates(path) -> tuple[str, ...]:
    """One template per non-empty line of a UTF-8 text file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"templates file {str(path)!r} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"templates file {str(path)!r} has no templates")
    return check_templates(lines)


def class_prompt_lists(class_names: Sequence[str], templates: Sequence[str] = (),
                       class_prompts: Optional[Mapping[str, Sequence[str]]] = None) -> list[tuple[str, ...]]:
    """Per class, the prompts to average: ``class_prompts[name]`` when given, else every template filled."""
    names = [str(c) for c in class_names]
    if not names:
        raise ValueError("zero-shot needs at least one class name")
    if class_prompts is not None and not isinstance(class_prompts, Mapping):
        raise TypeError(f"class_prompts must be a dict class name -> list of prompts, "
                        f"got {type(class_prompts).__name__}")
    given = {str(k): v for k, v in (class_prompts or {}).items()}
    unknown = sorted(set(map(str, given)) - set(names))
    if unknown:
        raise ValueError(f"prompts given for classes {unknown[:5]} that are not among the classes: {names[:10]}")
    out = []
    checked = None
    for name in names:
        if name in given:
            prompts = given[name]
            prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"class_prompts[{name!r}] must be a non-empty list of non-empty strings, "
                                 f"got {prompts!r}")
            out.append(prompts)
        else:
            checked = checked or check_templates(templates)
            out.append(tuple(fill(t, name) for t in checked))
    return out


@torch.no_grad()
def ensemble_token_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor],
                              tokens_per_class: Sequence[torch.Tensor], batch_size: int = 256,
                              device: Optional[torch.device] = None) -> torch.Tensor:
    """(C, D) float32 from prompts already tokenised, one (P_c, L) tensor per class: per class the
    normalised mean of its prompts' normalised text embeddings."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not len(tokens_per_class):
        raise ValueError("no classes: at least one class with one prompt is needed")
    counts = torch.tensor([int(t.shape[0]) for t in tokens_per_class])
    if (counts == 0).any():
        raise ValueError(f"every class needs at least one prompt; prompts per class: {counts.tolist()}")
    flat = torch.cat([torch.as_tensor(t) for t in tokens_per_class])
    chunks = []
    for start in range(0, flat.shape[0], batch_size):
        tokens = flat[start:start + batch_size]
        chunks.append(F.normalize(encode_text(tokens if device is None else tokens.to(device)).float(), dim=-1))
    per_prompt = torch.cat(chunks)  # (P, D)
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts).to(per_prompt.device)
    sums = per_prompt.new_zeros(len(counts), per_prompt.shape[1]).index_add_(0, owner, per_prompt)
    return F.normalize(sums / counts.to(sums)[:, None], dim=-1)


def ensemble_text_embeddings(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                             prompts_per_class: Sequence[Sequence[str]], batch_size: int = 256,
                             device: Optional[torch.device] = None) -> torch.Tensor:
    """(C, D) float32: per class the normalised mean of its prompts' normalised text embeddings."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups = [tuple(g) for g in prompts_per_class]
    if any(not g for g in groups):
        raise ValueError("every class needs at least one prompt")
    prompts = [p for group in groups for p in group]
    tokens = torch.cat([torch.as_tensor(tokenizer(prompts[s:s + batch_size])) for s in range(0, len(prompts), batch_size)])
    return ensemble_token_embeddings(encode_text, list(tokens.split([len(g) for g in groups])), batch_size, device)


def zero_shot_weights(model, tokenizer: Callable, class_names: Sequence[str], templates: Sequence[str] = (),
                      class_prompts: Optional[Mapping[str, Sequence[str]]] = None,
                      batch_size: int = 256) -> torch.Tensor:
    """(C, D) class embeddings of ``model.encode_text`` on the model's device (see module docstring)."""
    if not callable(getattr(model, "encode_text", None)):
        raise TypeError(f"zero-shot needs a model with encode_text(); {type(model).__name__} has none")
    device = next((p.device for p in model.parameters()), None) if hasattr(model, "parameters") else None
    return ensemble_text_embeddings(model.encode_text, tokenizer, class_prompt_lists(class_names, templates,
                                                                                      class_prompts),
                                    batch_size, device)
