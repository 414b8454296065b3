"""Action recognition with any model: ``classify`` videos (top-k labels) and ``evaluate`` a labelled set.

The model needs ``classify_video(clips (B,T,3,H,W)) -> (B,C)`` logits; for zero-shot,
wrap an ``encode_video`` + ``encode_text`` model in :class:`video.zeroshot.ZeroShotClassifier`.
Views (``"4x3"``) are decoded once per video and their scores averaged. Files that
fail are skipped, counted and listed; they never stop a run.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrieval.names import json_text
from video.datasets import VideoClipDataset, collate_skip_none
from video.plots import save_confusion_matrix
from video.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_clip_transform
from video.views import MultiViewDataset, ViewSpec, average_views, parse_views


@dataclass
class ClassifyResult:
    """Top-k for one video: ``labels`` and ``scores`` (probabilities), best first; ``error`` when it failed."""

    path: str
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    class_indices: list[int] = field(default_factory=list)
    error: str | None = None
    concealed: list[int] = field(default_factory=list)  # frames that did not decode, replaced by neighbours


@dataclass
class EvalResult:
    """Accuracy of a labelled set; ``confusion`` (C,C) counts, rows = true class."""

    top1: float
    top5: float
    per_class_accuracy: dict[str, float]
    confusion: torch.Tensor
    classes: list[str]
    num_videos: int
    num_evaluated: int
    failures: list[dict]
    views: str
    concealed: list[dict] = field(default_factory=list)  # clips with concealed frames: {"path", "frames"}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["confusion"] = self.confusion.long().tolist()
        return out


def _check_model(model) -> None:
    if not callable(getattr(model, "classify_video", None)):
        raise TypeError(f"{type(model).__name__} has no classify_video(clips); for zero-shot wrap it in "
                        "video.ZeroShotClassifier(model, tokenizer, class_names)")


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


def _scores(model, loader: DataLoader, views: ViewSpec, device: torch.device,
            bar: tqdm) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (labels (B,), sample indices (B,), probabilities (B,C)) per batch of views (B,V,T,3,H,W)."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                if batch is None:
                    bar.update(loader.batch_size or 1)
                    continue
                clips, labels, indices = batch
                b, v = clips.shape[:2]
                logits = model.classify_video(clips.flatten(0, 1).to(device))
                if logits.dim() != 2 or logits.shape[0] != b * v:
                    raise ValueError(f"classify_video returned shape {tuple(logits.shape)}, expected ({b * v}, C)")
                probs = average_views(logits.view(b, v, -1).float().cpu(), views.average).softmax(-1)
                bar.update(b)
                yield labels, indices, probs
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()


def _loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_skip_none, persistent_workers=False)


def classify(model, paths: Sequence[str | os.PathLike], class_names: Sequence[str] | None = None, topk: int = 5,
             num_frames: int = 8, sampling: str = "tsn", views: ViewSpec | str = "1x1",
             transform: Callable | None = None, image_size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
             batch_size: int = 4, num_workers: int = 0, device=None, backend: str = "auto", timeout_s: float = 30.0,
             progress: bool = True) -> list[ClassifyResult]:
    """Top-``topk`` labels with probabilities for each video in ``paths`` (in order).

    ``class_names`` default to ``model.class_names``. A file that fails gets a
    result with ``error`` set instead of labels.
    """
    _check_model(model)
    names = list(class_names) if class_names is not None else getattr(model, "class_names", None)
    if not names:
        raise ValueError("no class names: pass class_names (or --labels) or use a model with class_names")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no video paths given")
    views = parse_views(views)
    transform = transform or build_clip_transform(train=False, image_size=image_size, mean=mean, std=std)
    dataset = VideoClipDataset([(p, -1) for p in paths], list(names), num_frames, sampling=sampling,
                               train=False, transform=transform, backend=backend, timeout_s=timeout_s)
    results = [ClassifyResult(path=p) for p in paths]
    device = _device_of(model, device)
    k = min(topk, len(names))
    with tqdm(total=len(paths), desc="classify", unit="video", disable=not progress) as bar:
        for _, positions, probs in _scores(model, _loader(MultiViewDataset(dataset, views), batch_size, num_workers),
                                        views, device, bar):
            if probs.shape[1] != len(names):
                raise ValueError(f"the model gives {probs.shape[1]} classes but {len(names)} class names were given")
            top = probs.topk(k, dim=-1)
            for pos, values, idx in zip(positions.tolist(), top.values, top.indices):
                r = results[pos]
                r.class_indices = idx.tolist()
                r.labels = [names[i] for i in r.class_indices]
                r.scores = [float(x) for x in values]
    for failure in dataset.failures:
        for r in results:
            if r.path == failure.path and not r.labels:
                r.error = failure.reason
    for clip in dataset.concealed:
        for r in results:
            if r.path == clip.path:
                r.concealed = sorted(set(r.concealed) | set(clip.frames))
    return results


def evaluate(model, dataset: VideoClipDataset, views: ViewSpec | str = "1x1", batch_size: int = 2,
             num_workers: int = 2, out_dir: str | os.PathLike | None = None, device=None,
             progress: bool = True) -> EvalResult:
    """Top-1 / top-5 / per-class accuracy and the confusion matrix of ``model`` on ``dataset`` (train=False).

    With ``out_dir``: writes metrics.json, confusion.json, confusion.png,
    classes.json (class -> index) and predictions.jsonl; failed files are listed
    in metrics.json under "failures" (count "num_failed"), clips evaluated with concealed frames
    under "concealed" (counts "num_concealed_clips", "num_concealed_frames").
    """
    _check_model(model)
    views = parse_views(views)
    classes = list(dataset.classes)
    c = len(classes)
    before = len(dataset.failures)
    concealed_before = len(dataset.concealed)
    device = _device_of(model, device)
    all_labels, all_indices, all_probs = [], [], []
    with tqdm(total=len(dataset), desc=f"eval {views}", unit="video", disable=not progress) as bar:
        for labels, indices, probs in _scores(model, _loader(MultiViewDataset(dataset, views), batch_size,
                                                             num_workers), views, device, bar):
            if probs.shape[1] != c:
                raise ValueError(f"the model gives {probs.shape[1]} classes, the dataset has {c}: {classes[:5]}...")
            all_labels.append(labels)
            all_indices.append(indices)
            all_probs.append(probs)
    failures = [asdict(f) for f in dataset.failures[before:]]
    concealed = [asdict(c) for c in dataset.concealed[concealed_before:]]
    labels = torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.long)
    probs = torch.cat(all_probs) if all_probs else torch.zeros(0, c)
    indices = torch.cat(all_indices) if all_indices else torch.zeros(0, dtype=torch.long)
    n = labels.numel()
    pred = probs.argmax(-1) if n else labels
    top5 = probs.topk(min(5, c), dim=-1).indices if n else torch.zeros(0, 1, dtype=torch.long)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {classes[i]: float(confusion[i, i] / confusion[i].sum())
                 for i in range(c) if confusion[i].sum() > 0}
    result = EvalResult(
        top1=float((pred == labels).float().mean()) if n else 0.0,
        top5=float((top5 == labels[:, None]).any(-1).float().mean()) if n else 0.0,
        per_class_accuracy=per_class, confusion=confusion, classes=classes, num_videos=len(dataset),
        num_evaluated=n, failures=failures, views=str(views), concealed=concealed,
    )
    if out_dir is not None:
        _write_eval(result, dataset, labels, indices, probs, Path(out_dir))
    return result


def _write_eval(result: EvalResult, dataset: VideoClipDataset, labels: torch.Tensor, indices: torch.Tensor,
                probs: torch.Tensor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = result.to_dict()
    metrics.pop("confusion")
    metrics["num_failed"] = len(result.failures)
    metrics["num_concealed_clips"] = len(result.concealed)
    metrics["num_concealed_frames"] = sum(len(c["frames"]) for c in result.concealed)
    (out / "metrics.json").write_text(json_text(metrics, indent=2) + "\n", encoding="utf-8")
    dataset.save_class_index(out / "classes.json")
    save_confusion_matrix(result.confusion, result.classes, out / "confusion.png", out / "confusion.json",
                          title=f"top-1 {result.top1:.3f}, views {result.views}")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for index, label, p in zip(indices.tolist(), labels.tolist(), probs):
            path = dataset.samples[index][0]
            pred = int(p.argmax())
            fh.write(json_text({"path": path, "label": result.classes[label], "predicted": result.classes[pred],
                                "score": round(float(p[pred]), 6)}) + "\n")
