"""Demo stages 3-4: held-out retrieval (Recall@K both ways) and action recognition (supervised + zero-shot)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


from ernie_vl.app.demo.runner import StageContext
from ernie_vl.app.demo.workspace import Workspace, read_captions


def embed_split(model: Any, csv_path: Path, batch_size: int, progress: bool) -> dict:
    """Embed the distinct images and every caption of a CSV: ``images`` (N, D), ``texts`` (T, D), ``text_to_image``."""
    from retrieval import embed_images, embed_texts

    paths, captions = read_captions(csv_path)
    distinct = list(dict.fromkeys(paths))
    position = {p: i for i, p in enumerate(distinct)}
    result = embed_images(model, distinct, batch_size=batch_size, num_workers=0, progress=progress)
    if result.failures:
        kept = {distinct[i] for i in result.positions}
        pairs = [(p, c) for p, c in zip(paths, captions) if p in kept]
        distinct = [distinct[i] for i in result.positions]
        position = {p: i for i, p in enumerate(distinct)}
        paths, captions = [p for p, _ in pairs], [c for _, c in pairs]
    texts = embed_texts(model, captions, batch_size=256)
    return {
        "images": result.embeddings, "texts": texts,
        "text_to_image": [position[p] for p in paths],
        "image_paths": distinct, "captions": captions, "failures": result.failures,
    }


def retrieval_metrics(model: Any, csv_path: Path, batch_size: int, progress: bool) -> dict:
    """Recall@1/5/10 both directions on one CSV, plus the chance level and the sizes."""
    from retrieval import recall_at_k

    emb = embed_split(model, csv_path, batch_size, progress)
    metrics = recall_at_k(emb["images"], emb["texts"], emb["text_to_image"], ks=(1, 5, 10))
    n = len(emb["image_paths"])
    metrics.update({"num_images": n, "num_captions": len(emb["captions"]), "chance_R@1": 1.0 / n,
                    "skipped_images": len(emb["failures"])})
    return metrics


def evaluate_retrieval(ws: Workspace, ctx: StageContext) -> dict:
    """Held-out compositions (unseen colour-shape pairs) and, for contrast, seen combinations."""
    model = ws.model()
    splits = ["heldout"] + (["val"] if ws.cfg.num_val_images else [])
    bar = ctx.bar(total=len(splits), unit="split")
    out = {}
    for split in splits:
        bar.set_postfix_str(split)
        out[split] = retrieval_metrics(model, ws.csv(split), ws.cfg.eval_batch_size, progress=False)
        bar.update(1)
    return out


def class_prompts(ws: Workspace, classes: list[str]) -> dict[str, list[str]]:
    """Class -> text prompts from the clips' ``prompts.json`` (what training paired the clips with)."""
    from ernie_vl.data.synthetic import load_prompts

    prompts = load_prompts(ws.videos("val")) or load_prompts(ws.videos("train")) or {}
    return {c: prompts.get(c) or [f"a video of {c.replace('_', ' ')}"] for c in classes}


def _eval_dict(result: Any) -> dict:
    """The plain figures of a ``video.EvalResult``."""
    return {"top1": float(result.top1), "top5": float(result.top5), "num_videos": int(result.num_videos),
            "num_evaluated": int(result.num_evaluated), "num_failed": len(result.failures),
            "per_class_accuracy": dict(result.per_class_accuracy)}


def clip_transform(model: Any) -> Any:
    """The evaluation clip transform matching the model's image preprocessing."""
    import video

    pre = model.preprocess
    return video.build_clip_transform(train=False, image_size=pre.image_size, mean=pre.mean, std=pre.std)


def validation_clips(ws: Workspace, model: Any) -> Any:
    import video

    return video.VideoFolder(ws.videos("val"), num_frames=ws.cfg.num_frames, sampling="uniform", train=False,
                             transform=clip_transform(model), classes=model.class_names,
                             isolation="inline")  # our own freshly written files: decode in-process


def evaluate_actions(ws: Workspace, ctx: StageContext) -> dict:
    """Top-1/top-5 on the validation clips: the supervised head and zero-shot from the class prompts.

    Writes ``actions/{supervised,zero_shot}/`` (metrics, confusion JSON/PNG, predictions) with the
    video pipeline, and the supervised confusion matrix as ``confusion_matrix.png``.
    """
    import video

    model = ws.model()
    dataset = validation_clips(ws, model)
    classes = list(dataset.classes)
    bar = ctx.bar(total=2, unit="mode")
    bar.set_postfix_str("supervised")
    supervised = video.evaluate(model, dataset, num_workers=0, out_dir=ws.actions_dir / "supervised",
                                progress=False)
    bar.update(1)
    bar.set_postfix_str("zero-shot")
    prompts = class_prompts(ws, classes)
    zero_shot_model = video.ZeroShotClassifier(model, model.tokenizer, classes, class_prompts=prompts, logit_scale=100.0)
    zero_shot = video.evaluate(zero_shot_model, dataset, num_workers=0,
                               out_dir=ws.actions_dir / "zero_shot", progress=False)
    bar.update(1)
    video.save_confusion_matrix(supervised.confusion, classes, ws.figure("confusion_matrix.png"),
                                title=f"Actions, supervised head\ntop-1 {supervised.top1:.3f} on "
                                      f"{supervised.num_evaluated} clips")
    return {"classes": classes, "supervised": _eval_dict(supervised), "zero_shot": _eval_dict(zero_shot),
            "chance_top1": 1.0 / len(classes), "confusion_matrix": supervised.confusion.long().tolist(),
            "prompts": prompts}
