"""Image classification evaluation (CLIP_benchmark style): labelled images, zero-shot logits, metrics.

Works with any model that has ``encode_image`` / ``encode_text`` (ErnieVL, open_clip).
Labelled images are ``ROOT/<class>/<file>`` or a CSV with columns ``path,label`` (paths
relative to the CSV). Metrics: top-1, top-5, mean per-class recall, per-class recall and
the confusion matrix (rows = true class, columns = predicted).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from encoders.prompts import IMAGE_TEMPLATES, zero_shot_weights
from retrieval.datasets import list_image_files, read_csv_columns
from retrieval.embed import embed_images


@dataclass
class LabelledImages:
    """``paths`` and their class indices ``labels`` into ``classes``."""

    paths: list[str]
    labels: list[int]
    classes: list[str]

    @classmethod
    def load(cls, data: str | os.PathLike, classes: Optional[Sequence[str]] = None) -> "LabelledImages":
        """From ``ROOT/<class>/<file>`` or a ``path,label`` CSV. ``classes`` (e.g. a labels file) fixes the
        class list and its order; every label in the data must be one of them. Default: the sorted labels."""
        data = Path(data)
        if data.is_dir():
            folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
            rows = [(str(f), folder.name) for folder in folders for f in list_image_files(folder)]
            if not rows:
                raise ValueError(f"{str(data)!r} has no images in class folders ROOT/<class>/<file>")
        elif data.is_file() and data.suffix.lower() == ".csv":
            raw = read_csv_columns(data, ("path", "label"))
            rows = [(p if os.path.isabs(p) else str(data.parent / p), label) for p, label in raw]
            if not rows:
                raise ValueError(f"labelled-images CSV {str(data)!r} has no rows")
        else:
            raise ValueError(f"labelled images {str(data)!r} must be a folder ROOT/<class>/<file> or a CSV "
                             f"with columns path,label")
        names = list(classes) if classes is not None else sorted({label for _, label in rows})
        position = {name: i for i, name in enumerate(names)}
        unknown = sorted({label for _, label in rows} - set(position))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} in {str(data)!r} are not among the {len(names)} classes "
                             f"{names[:10]}")
        return cls([p for p, _ in rows], [position[label] for _, label in rows], names)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class EmbeddedImages:
    """``embeddings`` (N_ok, D) L2-normalised, ``labels`` (N_ok,), ``paths``, ``failures`` [(path, reason)]."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)


def embed_labelled(model: Any, data: LabelledImages, preprocess: Callable, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = True, normalize: bool = True) -> EmbeddedImages:
    """Image embeddings of ``data`` (L2-normalised when ``normalize``); unreadable files are skipped and listed."""
    result = embed_images(model, data.paths, batch_size=batch_size, num_workers=num_workers, preprocess=preprocess,
                          progress=progress, normalize=normalize)
    if not result.paths:
        raise ValueError(f"none of the {len(data)} images could be read (e.g. {result.failures[:1]})")
    labels = torch.tensor([data.labels[i] for i in result.positions], dtype=torch.int64)
    return EmbeddedImages(torch.from_numpy(result.embeddings), labels, [str(p) for p in result.paths],
                          list(result.failures))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """top-1, top-5 (k capped at the class count), mean per-class recall, per-class recall, confusion (C,C)."""
    c = len(classes)
    if logits.ndim != 2 or logits.shape[1] != c or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match {labels.shape[0]} labels over {c} classes")
    ranked = logits.topk(min(5, c), dim=1).indices
    predicted = ranked[:, 0]
    confusion = torch.zeros(c, c, dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(1)
    recall = confusion.diag().double() / support.clamp_min(1)
    present = support > 0
    return {"top1": float((predicted == labels).double().mean()),
            "top5": float((ranked == labels[:, None]).any(1).double().mean()),
            "mean_per_class_recall": float(recall[present].mean()),
            "per_class_recall": {classes[i]: float(recall[i]) for i in range(c) if present[i]},
            "num_images": int(labels.shape[0]), "confusion": confusion}


def prompt_name(name: str) -> str:
    """Folder-style class names read better in prompts: "golden_retriever" -> "golden retriever"."""
    return name.replace("_", " ").strip()


@torch.no_grad()
def zero_shot_logits(model: Any, tokenizer: Callable, embeddings: torch.Tensor, classes: Sequence[str],
                     templates: Sequence[str] = IMAGE_TEMPLATES,
                     class_prompts: Optional[Mapping[str, Sequence[str]]] = None) -> torch.Tensor:
    """(N, C) cosine similarities x 100 between normalised image embeddings and the class prompt ensembles."""
    prompts = {prompt_name(k): v for k, v in (class_prompts or {}).items()}
    weights = zero_shot_weights(model, tokenizer, [prompt_name(c) for c in classes], templates, prompts)
    return 100.0 * embeddings.float() @ weights.cpu().t()
