"""``ernie-vl classify MODEL video.mp4 [more.mp4 ...]``: top-k action labels for each video."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from video.cli_support import (add_model_options, build_classifier, clip_transform_for, model_frames,
                                read_class_prompts, read_labels)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify the action in video files (supervised head or zero-shot)",
        description="Print the top-k labels with probabilities for each video. MODEL is an ErnieVL checkpoint "
                    "folder or open_clip:ARCH[:PRETRAINED] (zero-shot only). Files that cannot be decoded "
                    "are reported and skipped; the exit code is 1 when any failed.",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("videos", nargs="+", type=Path, help="video files")
    p.add_argument("--topk", type=int, default=5, help="labels per video (default 5)")
    p.add_argument("--views", default="1x1", help="test views CLIPSxCROPS, e.g. 4x3 (default 1x1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import load_model
    from video.pipeline import classify

    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    loaded = load_model(args.model)
    names = read_labels(args.labels) if args.labels else getattr(loaded.model, "class_names", None)
    if not names:
        raise ValueError(f"model {loaded.model_id!r} has no class names; pass --labels FILE")
    classifier = build_classifier(loaded, list(names), args.zero_shot, args.templates,
                                  class_prompts=read_class_prompts(args.prompts) if args.prompts else None)
    results = classify(classifier, args.videos, class_names=names, topk=args.topk,
                       num_frames=model_frames(loaded.model, args.frames), sampling=args.sampling, views=args.views,
                       transform=clip_transform_for(loaded), device=args.device, timeout_s=args.timeout,
                       progress=not args.no_progress)
    failed = [r for r in results if r.error]
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2, ensure_ascii=False))
    else:
        for r in results:
            print(r.path)
            if r.error:
                print(f"  error: {r.error}")
            for label, score in zip(r.labels, r.scores):
                print(f"  {score:7.4f}  {label}")
    if failed:
        print(f"{len(failed)} of {len(results)} videos could not be decoded", file=sys.stderr)
    return 1 if failed else 0
