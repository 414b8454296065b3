"""``ernie-vl eval-zeroshot MODEL DATA --labels classes.txt [--templates templates.txt]``: zero-shot image
classification (CLIP_benchmark style): top-1, top-5, mean per-class recall, confusion matrix PNG + JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional


def add_image_data_options(p: argparse.ArgumentParser, out: str, labels_help: str) -> None:
    """Options shared by the image classification commands (``out``: the default output folder)."""
    p.add_argument("--labels", type=Path, default=None, help=labels_help)
    p.add_argument("--out", type=Path, default=Path(out),
                   help=f"folder for metrics.json, confusion.png/.json, predictions.jsonl (default {out})")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decode workers (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def write_classification_report(out: Path, metrics: dict[str, Any], classes: list[str], paths: list[str],
                                labels, logits, failures: list, extra: Optional[dict] = None) -> dict[str, Any]:
    """metrics.json, confusion.png / .json and predictions.jsonl in ``out``; returns the JSON-able metrics."""
    from video.plots import save_confusion_matrix

    out.mkdir(parents=True, exist_ok=True)
    confusion = metrics.pop("confusion")
    save_confusion_matrix(confusion, classes, out / "confusion.png", out / "confusion.json")
    ranked = logits.topk(min(5, len(classes)), dim=1).indices
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for path, label, top in zip(paths, labels.tolist(), ranked.tolist()):
            f.write(json.dumps({"path": path, "label": classes[label], "top": [classes[i] for i in top]},
                               ensure_ascii=False) + "\n")
    report = {**(extra or {}), **metrics, "num_failed": len(failures),
              "failures": [{"path": p, "reason": why} for p, why in failures]}
    (out / "metrics.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def print_summary(report: dict[str, Any], out: Path, as_json: bool = False) -> None:
    """The report as one JSON object (without the per-file lists), or three readable lines."""
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("failures", "per_class_recall")}))
        return
    print(f"model {report['model']}  images {report['num_images']}  skipped {report['num_failed']}")
    print(f"top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%  "
          f"mean per-class recall {100 * report['mean_per_class_recall']:.2f}%")
    print(f"results: {out}")


def evaluate_zero_shot(model_spec: str, data: str | Path, labels_file: Optional[str | Path] = None,
                       templates_file: Optional[str | Path] = None, batch_size: int = 64, workers: int = 2,
                       progress: bool = True, loaded: Any = None) -> tuple[dict[str, Any], Any]:
    """(metrics incl. ``confusion``, the embedded images and their logits) of zero-shot on ``data``."""
    from encoders.prompts import IMAGE_TEMPLATES, read_templates
    from ernie_vl.app.hub import load_model
    from retrieval.classify import LabelledImages, classification_metrics, embed_labelled, zero_shot_logits
    from video.cli_support import read_labels

    loaded = loaded or load_model(model_spec)
    classes = read_labels(Path(labels_file)) if labels_file else None
    images = LabelledImages.load(data, classes)
    templates = read_templates(templates_file) if templates_file else IMAGE_TEMPLATES
    embedded = embed_labelled(loaded.model, images, loaded.preprocess, batch_size, workers, progress)
    logits = zero_shot_logits(loaded.model, loaded.tokenizer, embedded.embeddings, images.classes, templates)
    metrics = classification_metrics(logits, embedded.labels, images.classes)
    metrics.update(model=loaded.model_id, templates=list(templates), classes=images.classes)
    return metrics, (embedded, logits, images.classes)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    metrics, (embedded, logits, classes) = evaluate_zero_shot(args.model, args.data, args.labels, args.templates,
                                                             args.batch_size, args.workers, not args.no_progress)
    report = write_classification_report(args.out, metrics, classes, embedded.paths, embedded.labels, logits,
                                         embedded.failures)
    print_summary(report, args.out, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval-zeroshot", help="zero-shot image classification on ROOT/<class>/* or a "
                              "path,label CSV", description=__doc__)
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("data", type=Path, help="folder ROOT/<class name>/<image>, or a CSV with columns path,label")
    p.add_argument("--templates", type=Path, default=None,
                   help="prompt templates, one per line with {label}, {c} or {} (default: 4 photo templates)")
    add_image_data_options(p, "runs/eval-zeroshot", "class names, one per line (default: DATA's labels, sorted)")
    p.set_defaults(func=run)
