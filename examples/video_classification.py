"""Classify video files and evaluate a labelled folder of videos (top-1 / top-5, confusion matrix).

Run against the demo's outputs (after ``ernie-vl demo``):

    python examples/video_classification.py runs/demo/model runs/demo/data/motion/val \
        --out runs/examples/video-eval --views 2x1

    # zero-shot: no classifier head, the class prompts of ROOT/prompts.json (or "a video of {label}.")
    python examples/video_classification.py runs/demo/model runs/demo/data/motion/val \
        --out runs/examples/video-eval-zs --zero-shot

The folder is ``ROOT/<class name>/<file>.mp4`` (Kinetics layout). A file that cannot be
decoded is skipped, counted and listed in OUT/metrics.json; it never stops the run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="ErnieVL checkpoint folder (e.g. runs/demo/model)")
    p.add_argument("videos", type=Path, help="labelled folder ROOT/<class>/<file>.mp4")
    p.add_argument("--out", type=Path, default=Path("runs/examples/video-eval"))
    p.add_argument("--views", default="1x1", help="temporal clips x spatial crops averaged per video, e.g. 4x3")
    p.add_argument("--zero-shot", action="store_true", help="classify by text prompts instead of the trained head")
    p.add_argument("--show", type=int, default=4, help="how many single files to classify and print first")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N videos per class (0 = all)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import video
    from ernie_vl import ErnieVL

    model = ErnieVL.from_pretrained(args.model).eval()
    pre = model.preprocess
    num_frames = model.cfg.video_encoder.num_frames
    transform = video.build_clip_transform(train=False, image_size=pre.image_size, mean=pre.mean, std=pre.std)
    dataset = video.VideoFolder(args.videos, num_frames=num_frames, sampling="uniform", transform=transform,
                                classes=None if args.zero_shot else model.class_names)
    if args.limit:  # keep the first N files of each class
        kept, seen = [], {}
        for path, label in dataset.samples:
            if seen.get(label, 0) < args.limit:
                kept.append((path, label))
                seen[label] = seen.get(label, 0) + 1
        dataset.samples = kept
    classifier = _zero_shot(model, args.videos, dataset.classes) if args.zero_shot else model

    # 1. A few single files, the way `ernie-vl classify MODEL clip.mp4` does it.
    picked = [path for path, _ in dataset.samples[:: max(1, len(dataset) // max(args.show, 1))]][: args.show]
    for res in video.classify(classifier, picked, class_names=dataset.classes, topk=3, num_frames=num_frames,
                              sampling="uniform", transform=transform, progress=False):
        guesses = ", ".join(f"{label} {score:.2f}" for label, score in zip(res.labels, res.scores))
        print(f"{Path(res.path).parent.name}/{Path(res.path).name}: {res.error or guesses}")

    # 2. The whole folder: top-1 / top-5, per-class accuracy, confusion matrix (PNG + JSON) in --out.
    result = video.evaluate(classifier, dataset, views=args.views, num_workers=0, out_dir=args.out)
    summary = {"top1": result.top1, "top5": result.top5, "videos": result.num_evaluated,
               "failed": len(result.failures), "views": result.views, "zero_shot": args.zero_shot,
               "confusion_png": str(args.out / "confusion.png")}
    print(json.dumps(summary, indent=2))
    return summary


def _zero_shot(model, root: Path, classes: list[str]):
    """A classifier from the class prompts in ROOT/prompts.json, else the default templates."""
    import video

    prompts_file = root / "prompts.json"
    if prompts_file.is_file():
        prompts = json.loads(prompts_file.read_text())
        return video.ZeroShotClassifier(model, model.tokenizer, [prompts[c][0] for c in classes],
                                        templates=("{label}",))
    return video.ZeroShotClassifier(model, model.tokenizer, [c.replace("_", " ") for c in classes])


if __name__ == "__main__":
    main(sys.argv[1:])
