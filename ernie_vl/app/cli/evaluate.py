"""``ernie-vl eval``: Recall@1/5/10 both ways on an image-text CSV and top-1/top-5 on labelled videos."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional


def evaluate_checkpoint(model_dir: str, pairs: Optional[str] = None, videos: Optional[str] = None,
                        num_frames: Optional[int] = None, num_workers: int = 2, progress: bool = True,
                        image_col: str = "filepath", caption_col: str = "caption") -> dict[str, Any]:
    """Load ``model_dir`` (``save_pretrained`` folder) and evaluate it; keys as in ``ernie_vl.train.evaluation``."""
    import torch

    from ernie_vl.data.sources import CachedPairs, CachedVideos, cpu_workers
    from ernie_vl.model import ErnieVL
    from ernie_vl.train.evaluation import evaluate

    if not pairs and not videos:
        raise ValueError("give --pairs CSV and/or --videos DIR_OR_CSV to evaluate on")
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"{model_dir!r} is not a model folder (no config.json); pass a save_pretrained folder")
    model = ErnieVL.from_pretrained(model_dir)
    workers = cpu_workers(num_workers)
    pair_source = CachedPairs([pairs], model.preprocess, model.tokenizer, image_col, caption_col, workers,
                              progress) if pairs else None
    video_source = None
    if videos:
        size = model.cfg.video_encoder.image_size
        video_source = CachedVideos([videos], num_frames or model.cfg.video_encoder.num_frames,
                                    int(size[0] if isinstance(size, (tuple, list)) else size),
                                    model.preprocess.mean, model.preprocess.std, model.tokenizer,
                                    classes=model.class_names, num_workers=workers, progress=progress)
    with torch.inference_mode():
        result: dict[str, Any] = evaluate(model, pair_source, video_source)
    if pair_source is not None:
        result["num_pairs"] = len(pair_source)
        result["skipped_images"] = pair_source.failures.count
    if video_source is not None:
        result["num_videos"] = len(video_source)
        result["skipped_videos"] = video_source.failures.count
    return result


def run(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.model, args.pairs, args.videos, args.num_frames, args.num_workers,
                                 progress=not args.json, image_col=args.image_col, caption_col=args.caption_col)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a trained model: Recall@K on pairs, top-1/top-5 on videos",
                              description=__doc__)
    p.add_argument("--model", required=True, help="a save_pretrained folder (e.g. runs/x/final)")
    p.add_argument("--pairs", default=None, metavar="CSV", help="image-text CSV (filepath,caption)")
    p.add_argument("--videos", default=None, metavar="DIR_OR_CSV", help="ROOT/<class>/<file> folder or path,label CSV")
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--image-col", default="filepath")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
