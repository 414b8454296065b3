"""``ernie-vl eval-video MODEL ROOT``: top-1 / top-5, per-class accuracy and a confusion matrix on labelled videos."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from video.cli_support import (add_model_options, build_classifier, clip_transform_for, model_frames,
                                read_class_prompts, read_labels)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-video",
        help="evaluate action recognition on ROOT/<class>/<video> or a path,label CSV",
        description="Top-1 / top-5 accuracy with multi-view testing. Writes metrics.json, confusion.png, "
                    "confusion.json, classes.json and predictions.jsonl into --out. Files that cannot be "
                    "decoded are skipped and listed in metrics.json.",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("root", type=Path, help="folder ROOT/<class name>/<video>, or a CSV with columns path,label")
    p.add_argument("--views", default="1x1", help="test views CLIPSxCROPS, e.g. 4x3 (default 1x1)")
    p.add_argument("--out", type=Path, default=Path("runs/eval-video"), help="output folder (default runs/eval-video)")
    p.add_argument("--batch-size", type=int, default=2, help="videos per batch (default 2)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decode workers (default 2)")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import load_model
    from video.datasets import VideoCSV, VideoFolder
    from video.pipeline import evaluate

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    if not args.root.exists():
        raise FileNotFoundError(f"{str(args.root)!r} does not exist")
    loaded = load_model(args.model)
    names = read_labels(args.labels) if args.labels else getattr(loaded.model, "class_names", None)
    if not names and not args.zero_shot:
        raise ValueError(f"model {loaded.model_id!r} has no class names; pass --labels FILE or use --zero-shot")
    options = dict(num_frames=model_frames(loaded.model, args.frames), sampling=args.sampling, train=False,
                   transform=clip_transform_for(loaded), timeout_s=args.timeout, classes=names or None)
    dataset = VideoCSV(args.root, **options) if args.root.is_file() else VideoFolder(args.root, **options)
    classifier = build_classifier(loaded, dataset.classes, args.zero_shot, args.templates,
                                  class_prompts=read_class_prompts(args.prompts) if args.prompts else None)
    result = evaluate(classifier, dataset, views=args.views, batch_size=args.batch_size, num_workers=args.workers,
                      out_dir=args.out, device=args.device, progress=not args.no_progress)
    print(f"model {loaded.model_id}  views {result.views}  videos {result.num_evaluated}/{result.num_videos}")
    print(f"top-1 {100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%")
    frames = sum(len(c["frames"]) for c in result.concealed)
    print(f"failed {len(result.failures)}  concealed {len(result.concealed)} clip(s) ({frames} frame(s) "
          "that did not decode, replaced by their nearest decodable frame)")
    if result.failures:
        print(f"{len(result.failures)} videos could not be decoded (listed in {args.out / 'metrics.json'}):",
              file=sys.stderr)
        for f in result.failures[:10]:
            print(f"  {f['path']}: {f['reason']}", file=sys.stderr)
    print(f"results: {args.out}")
    return 0
