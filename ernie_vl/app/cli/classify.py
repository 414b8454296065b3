"""``ernie-vl classify MODEL FILE [FILE ...]``: top-k labels for each video (actions) or image file (zero-shot
with ``--labels``, or a saved linear probe with ``--probe``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from retrieval.names import json_text, printable
from video.cli_support import (add_model_options, build_classifier, clip_transform_for, model_frames,
                                read_class_prompts, read_labels)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify video files (actions: supervised head or zero-shot) or image files (zero-shot or a probe)",
        description="Print the top-k labels with probabilities for each file. Videos: the model's head, or "
                    "--zero-shot. Images: zero-shot over --labels (prompt ensembles of --templates), or a probe "
                    "saved by `ernie-vl linear-probe` (--probe DIR). MODEL is an ErnieVL checkpoint folder or "
                    "open_clip:ARCH[:PRETRAINED] (zero-shot only for videos). Files that cannot be read "
                    "are reported and skipped; the exit code is 1 when any failed.",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("videos", nargs="+", type=Path, metavar="FILE", help="video files, or image files")
    p.add_argument("--probe", type=Path, default=None, metavar="DIR",
                   help="images: a linear probe saved by `ernie-vl linear-probe` (OUT/probe)")
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
    from retrieval.images import is_image_path

    kinds = {is_image_path(p) for p in args.videos}
    if kinds == {True}:
        return run_images(args)
    if len(kinds) > 1:
        raise ValueError("give either image files or video files, not both")
    if args.probe is not None:
        raise ValueError("--probe classifies image files; these are videos")
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
        print(json_text([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            print(printable(r.path))
            if r.error:
                print(f"  error: {r.error}")
            if r.concealed:
                print(f"  concealed frames {r.concealed[:8]}: they did not decode, their nearest decodable frame "
                      "stands in")
            for label, score in zip(r.labels, r.scores):
                print(f"  {score:7.4f}  {label}")
    concealed = [r for r in results if r.concealed]
    if concealed:
        print(f"{len(concealed)} of {len(results)} videos had frames concealed", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(results)} videos could not be decoded", file=sys.stderr)
    return 1 if failed else 0


def run_images(args: argparse.Namespace) -> int:
    """Image files: zero-shot over ``--labels`` or a saved linear probe."""
    import torch

    from encoders.prompts import IMAGE_TEMPLATES, check_templates
    from ernie_vl.app.hub import load_model
    from retrieval.classify import zero_shot_logits
    from retrieval.embed import embed_images

    loaded = load_model(args.model)
    probe = None
    if args.probe is not None:
        from retrieval.probe import LinearProbe

        probe = LinearProbe.load(args.probe)
        names = probe.classes
        if probe.model_id and probe.model_id != loaded.model_id:
            print(f"warning: the probe was fitted on {probe.model_id}, not {loaded.model_id}", file=sys.stderr)
    else:
        names = read_labels(args.labels) if args.labels else None
        if not names:
            raise ValueError("image files need --labels FILE (zero-shot class names) or --probe DIR")
    from ernie_vl.app.image_features import ImageFeatures

    model = ImageFeatures(loaded.model, probe.features if probe is not None else "embedding")
    result = embed_images(model, args.videos, preprocess=loaded.preprocess, progress=not args.no_progress,
                          normalize=model.normalized)
    emb = torch.from_numpy(result.embeddings)
    if not len(result.paths):
        logits = torch.zeros(0, len(names))
    elif probe is not None:
        logits = probe.logits(emb)
    else:
        templates = check_templates(args.templates) if args.templates else IMAGE_TEMPLATES
        prompts = read_class_prompts(args.prompts) if args.prompts else None
        logits = zero_shot_logits(loaded.model, loaded.tokenizer, emb, names, templates, prompts)
    probs = logits.softmax(-1)
    top = probs.topk(min(args.topk, len(names)), dim=1) if len(probs) else None
    rows = [{"path": str(p), "labels": [names[i] for i in top.indices[j].tolist()],
             "scores": [round(float(v), 6) for v in top.values[j]], "error": None}
            for j, p in enumerate(result.paths)]
    rows += [{"path": str(p), "labels": [], "scores": [], "error": why} for p, why in result.failures]
    if args.json:
        print(json_text(rows, indent=2))
    else:
        for r in rows:
            print(printable(r["path"]))
            if r["error"]:
                print(f"  error: {r['error']}")
            for label, score in zip(r["labels"], r["scores"]):
                print(f"  {score:7.4f}  {label}")
    if result.failures:
        print(f"{len(result.failures)} of {len(rows)} images could not be read", file=sys.stderr)
    return 1 if result.failures else 0
