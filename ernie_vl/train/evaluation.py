"""Evaluation during and after training: Recall@K both ways, video top-1/top-5 (supervised and zero-shot).

Works on in-memory sources (``ernie_vl.data.sources.CachedPairs`` / ``CachedVideos``)
so that evaluating every N steps never decodes a file twice. Keys of the result:
``text_to_image_R@{1,5,10}``, ``image_to_text_R@{1,5,10}`` (``retrieval.recall_at_k``;
several captions of one image are grouped), ``video_top1``, ``video_top5``,
``video_zeroshot_top1``, ``video_zeroshot_top5``; fractions in [0, 1].
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from encoders.prompts import ensemble_token_embeddings


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _group_images(paths: list[str]) -> tuple[list[int], list[int]]:
    """(first row of each distinct image, in first-seen order; image position of each row)."""
    first_row: dict[str, int] = {}
    for row, path in enumerate(paths):
        first_row.setdefault(path, row)
    position = {path: i for i, path in enumerate(first_row)}
    return list(first_row.values()), [position[p] for p in paths]


@torch.no_grad()
def evaluate_pairs(model: Any, pairs: Any, batch_size: int = 256, max_items: Optional[int] = None) -> dict[str, float]:
    """Recall@1/5/10 both directions over a cached pair source (first ``max_items`` rows)."""
    from retrieval import recall_at_k

    n = len(pairs) if max_items is None else min(len(pairs), max_items)
    paths = pairs.paths[:n]
    image_rows, text_to_image = _group_images(paths)
    image_rows_t = torch.tensor(image_rows)
    img_emb = torch.cat([model.encode_image(pairs.batch(image_rows_t[s])[0]) for s in _chunks(len(image_rows), batch_size)])
    txt_emb = torch.cat([model.encode_text(pairs.tokens[s]) for s in _chunks(n, batch_size)])
    return recall_at_k(img_emb.float(), txt_emb.float(), text_to_image, ks=(1, 5, 10))


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest logits (k capped at the class count)."""
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = float((top == labels[:, None]).any(dim=1).float().mean())
    return out


@torch.no_grad()
def evaluate_videos(model: Any, videos: Any, batch_size: int = 32) -> dict[str, float]:
    """Supervised (``classify_video``) and zero-shot (class prompts) top-1/top-5 over a cached video source."""
    logits, video_emb = [], []
    for s in _chunks(len(videos), batch_size):
        clips = videos.norm.to_float(videos.clips[s])
        logits.append(model.classify_video(clips).float())
        video_emb.append(model.encode_video(clips).float())
    labels = videos.labels
    supervised = topk_accuracy(torch.cat(logits), labels)
    text = ensemble_token_embeddings(model.encode_text, videos.prompt_tokens)  # (C, D), prompt ensembling
    zero_shot = topk_accuracy(torch.cat(video_emb) @ text.t(), labels)
    return {"video_top1": supervised[1], "video_top5": supervised[5],
            "video_zeroshot_top1": zero_shot[1], "video_zeroshot_top5": zero_shot[5]}


def evaluate(model: Any, pairs: Any = None, videos: Any = None, max_pairs: Optional[int] = None) -> dict[str, float]:
    """Every metric the given sources allow; the model is put in eval mode and restored."""
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        if pairs is not None:
            out.update(evaluate_pairs(model, pairs, max_items=max_pairs))
        if videos is not None:
            out.update(evaluate_videos(model, videos))
        return out
    finally:
        model.train(was_training)
