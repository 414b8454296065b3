"""Demo stages 5-7: the search index with text and image queries, classifying videos, int8 quantization."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ernie_vl.app.demo import plots
from ernie_vl.app.demo.runner import StageContext
from ernie_vl.app.demo.stages_eval import clip_transform, embed_split, validation_clips
from ernie_vl.app.demo.workspace import Workspace, list_videos, read_captions


# ----------------------------------------------------------------------------- search
def _pick(items: list, n: int) -> list:
    """``n`` items spread evenly over the list (deterministic)."""
    if n <= 0 or not items:
        return []
    idx = np.linspace(0, len(items) - 1, num=min(n, len(items))).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def _hits(hits: list, root, caption_of: dict, ws: Workspace, truth: str | None) -> list[dict]:
    """``retrieval.SearchHit``s -> report dicts (path relative to the demo folder, caption, correctness)."""
    out = []
    for hit in hits:
        path = (root / hit.metadata["path"]).resolve()
        caption = caption_of.get(path, "")
        out.append({"path": ws.rel(path), "caption": caption, "score": float(hit.score),
                    "correct": None if truth is None else caption == truth})
    return out


def search_index(ws: Workspace, ctx: StageContext) -> dict:
    """Index the held-out images into ``DIR/index`` the way ``ernie-vl index`` does (so ``ernie-vl search``
    and ``serve`` use it), run text queries (held-out captions, whose image is known, and free-form
    ones) and one image query (a validation picture), and draw the gallery."""
    from ernie_vl.app.hub import model_spec_for_manifest
    from retrieval import search_image, search_text
    from retrieval.folder import index_folder

    cfg = ws.cfg
    model = ws.model()
    image_root = ws.shapes_dir / "images" / "heldout"
    index, update = index_folder(model, image_root, kind="flat", model_id=model.model_id,
                                 batch_size=cfg.eval_batch_size, progress=False,
                                 info={"model_spec": model_spec_for_manifest(str(ws.model_dir))})
    index.save(ws.index_dir)
    root = image_root.resolve()
    caption_of: dict = {}
    for path, caption in zip(*read_captions(ws.csv("heldout"))):
        caption_of.setdefault(path.resolve(), caption)

    held_captions = list(dict.fromkeys(caption_of.values()))
    text_queries = [(q, q) for q in _pick(held_captions, cfg.num_text_queries)]
    text_queries += [(q, None) for q in cfg.free_text_queries]
    bar = ctx.bar(total=len(text_queries) + 1, unit="query")
    queries = []
    for query, truth in text_queries:
        hits = search_text(model, index, query, k=len(index))
        ranked = _hits(hits, root, caption_of, ws, truth)
        true_rank = next((i + 1 for i, h in enumerate(ranked) if h["correct"]), None)
        queries.append({"query": query, "kind": "text", "hits": ranked[: cfg.top_k],
                        "rank_of_true_image": true_rank})
        bar.update(1)
    # an image query: a validation picture (not in the index)
    val_paths, val_caps = read_captions(ws.csv("val") if cfg.num_val_images else ws.csv("train"))
    hits = search_image(model, index, val_paths[0], k=cfg.top_k)
    queries.append({"query": val_caps[0], "kind": "image", "image": ws.rel(val_paths[0]),
                    "hits": _hits(hits, root, caption_of, ws, None)})
    bar.update(1)
    gallery_queries = [{**q, "image": str(ws.root / q["image"]) if q.get("image") else None,
                        "hits": [{**h, "path": str(ws.root / h["path"])} for h in q["hits"]]} for q in queries]
    plots.plot_query_gallery(gallery_queries, ws.figure("gallery.png"), max_hits=cfg.top_k,
                             title="Search over held-out images: text queries and one image query")
    found = [q["rank_of_true_image"] for q in queries if q.get("rank_of_true_image") is not None]
    return {"index": ws.rel(ws.index_dir), "indexed_images": len(index), "skipped_images": len(update.failures),
            "queries": queries, "true_image_at_rank_1": sum(r == 1 for r in found),
            "num_queries_with_truth": len(found)}


# ----------------------------------------------------------------------------- classify
def classify_videos(ws: Workspace, ctx: StageContext) -> dict:
    """Classify a few validation clips one file at a time, as a user would with ``ernie-vl classify``."""
    import video

    model = ws.model()
    items = list_videos(ws.videos("val"))
    by_class: dict[str, list] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    chosen = []
    while len(chosen) < min(ws.cfg.num_videos, len(items)):  # round-robin over the classes
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < ws.cfg.num_videos:
                chosen.append((by_class[label].pop(0), label))
    bar = ctx.bar(total=len(chosen), unit="video")
    videos = []
    for path, label in chosen:  # one call per file, as `ernie-vl classify MODEL clip.mp4` does
        (res,) = video.classify(model, [str(path)], topk=min(ws.cfg.top_k, 3), num_frames=ws.cfg.num_frames,
                                sampling="uniform", transform=clip_transform(model), progress=False)
        videos.append({"path": ws.rel(path), "label": label, "error": res.error,
                       "predictions": [[str(lbl), float(s)] for lbl, s in zip(res.labels, res.scores)]})
        bar.update(1)
    correct = sum(v["predictions"] and v["predictions"][0][0] == v["label"] for v in videos)
    return {"videos": videos, "correct": int(correct), "total": len(videos)}


# ----------------------------------------------------------------------------- int8
def _median_ms(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def quantize_and_check(ws: Workspace, ctx: StageContext) -> dict:
    """int8 weights for every linear layer; compares size, embeddings, held-out Recall@K and actions to fp32."""
    from ernie_vl.quantize import state_dict_bytes
    from retrieval import recall_at_k

    bar = ctx.bar(total=4, unit="step")
    fp32 = ws.model()
    bar.set_postfix_str("quantizing")
    int8 = ws.model(quantized=True)
    bar.update(1)
    bar.set_postfix_str("retrieval")
    a = embed_split(fp32, ws.csv("heldout"), ws.cfg.eval_batch_size, progress=False)
    b = embed_split(int8, ws.csv("heldout"), ws.cfg.eval_batch_size, progress=False)
    r_fp32 = recall_at_k(a["images"], a["texts"], a["text_to_image"])
    r_int8 = recall_at_k(b["images"], b["texts"], b["text_to_image"])
    bar.update(1)
    bar.set_postfix_str("actions")
    actions = _action_agreement(ws, fp32, int8)
    bar.update(1)
    bar.set_postfix_str("timing")
    images = torch.stack([fp32.preprocess(_load(p)) for p in a["image_paths"][:16]])
    with torch.inference_mode():
        ms_fp32 = _median_ms(lambda: fp32.encode_image(images))
        ms_int8 = _median_ms(lambda: int8.encode_image(images))
    bar.update(1)
    size_fp32, size_int8 = state_dict_bytes(fp32), state_dict_bytes(int8)
    agreement = {
        "size_ratio": size_int8 / size_fp32,
        "image_embedding_cosine": float((a["images"] * b["images"]).sum(1).mean()),
        "text_embedding_cosine": float((a["texts"] * b["texts"]).sum(1).mean()),
        **actions.pop("agreement"),
    }
    return {
        "size_bytes": {"fp32": size_fp32, "int8": size_int8},
        "agreement": agreement,
        "retrieval_fp32": r_fp32, "retrieval_int8": r_int8,
        "retrieval_R@1_change": r_int8["text_to_image_R@1"] - r_fp32["text_to_image_R@1"],
        **actions,
        "encode_image_ms_batch16": {"fp32": ms_fp32, "int8": ms_int8,
                                    "note": "2 shared CPU cores; indicative only"},
    }


def _load(path):
    from retrieval.images import load_image

    return load_image(path)


@torch.inference_mode()
def _action_agreement(ws: Workspace, fp32: Any, int8: Any) -> dict:
    """Top-1 of both models on the validation clips, and how often they agree."""
    import video

    dataset = validation_clips(ws, fp32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=video.collate_skip_none)
    pred_a, pred_b, labels = [], [], []
    for batch in loader:
        if batch is None:
            continue
        clips, y = batch
        pred_a.append(fp32.classify_video(clips).argmax(-1))
        pred_b.append(int8.classify_video(clips).argmax(-1))
        labels.append(y)
    pa, pb, y = torch.cat(pred_a), torch.cat(pred_b), torch.cat(labels)
    return {
        "video_top1_fp32": float((pa == y).float().mean()),
        "video_top1_int8": float((pb == y).float().mean()),
        "agreement": {"top1_agreement": float((pa == pb).float().mean())},
    }
