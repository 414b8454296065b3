"""The training flags shared by ``ernie-vl train`` and ``python -m ernie_vl.train`` (torchrun's entry), and
their mapping onto a ``TrainConfig``."""
from __future__ import annotations

import argparse
import json
from typing import Any

from encoders.convert import DIFF_INITS
from ernie_vl.train.config import TrainConfig

# CLI flag -> TrainConfig field, for the flags that map one to one
_SIMPLE = ("model", "out", "minutes", "max_steps", "batch_pairs", "batch_videos", "grad_accum", "lr", "min_lr_ratio",
           "weight_decay",
           "warmup_steps", "grad_clip", "autocast", "seed", "sampler", "video_sampler", "priority_alpha", "priority_uniform_mix",
           "priority_relative",
           "num_workers", "eval_every", "checkpoint_every", "checkpoint_minutes", "log_every", "num_frames", "val_pairs", "val_videos",
           "image_col", "caption_col", "powersgd_rank", "powersgd_warmup", "parallel", "expert_parallel", "threads", "curriculum_steps",
           "hard_negative_share", "hard_negative_group", "caption_positives", "p_hflip", "p_reverse", "speed_min", "mixup", "cutmix",
           "crop_min_area", "image_crop_min_area", "image_rotate", "recipe", "label_smoothing", "drop_path", "ema", "epochs", "freeze", "video_init",
           "video_diff_init")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``ernie-vl train`` and ``python -m ernie_vl.train`` (torchrun's entry)."""
    d = TrainConfig.__dataclass_fields__
    p.add_argument("--model", default="tiny", help="preset name (ernie-vl list-models) or a checkpoint folder")
    p.add_argument("--pairs", nargs="*", default=[], metavar="CSV", help="image-text CSVs (filepath,caption)")
    p.add_argument("--videos", nargs="*", default=[], metavar="DIR_OR_CSV",
                   help="labelled videos: ROOT/<class>/<file> folders or path,label CSVs")
    p.add_argument("--out", required=True, help="run folder: log.jsonl, train_state.safetensors, final/")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (the schedule is fitted to it)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: as many as --minutes allows)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from OUT/train_state.safetensors (warns when there is none; refuses "
                        "when OUT holds a run without one, or when a setting that defines the run changed)")
    p.add_argument("--batch-pairs", type=int, default=d["batch_pairs"].default, help="global image-text pairs per step")
    p.add_argument("--batch-videos", type=int, default=d["batch_videos"].default, help="global clips per step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=d["lr"].default)
    p.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"].default, metavar="R",
                   help="the cosine ends at R x --lr (default %(default)s; 1: flat after warm-up, so a resumed run "
                        "may take a larger --max-steps)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"].default)
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"].default)
    p.add_argument("--autocast", choices=("auto", "bf16", "none"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=("priority", "uniform"), default=d["sampler"].default,
                   help="image-text pair sampling")
    p.add_argument("--video-sampler", choices=("priority", "uniform"), default=d["video_sampler"].default,
                   help="clip sampling")
    p.add_argument("--priority-alpha", type=float, default=d["priority_alpha"].default)
    p.add_argument("--priority-uniform-mix", type=float, default=d["priority_uniform_mix"].default)
    p.add_argument("--priority-relative", action=argparse.BooleanOptionalAction,
                   default=d["priority_relative"].default,
                   help="record each loss as a ratio to its batch's mean (loss-priority sampling that compares "
                        "samples against the model of their own step, not how long ago they were seen)")
    p.add_argument("--hard-negative-share", type=float, default=d["hard_negative_share"].default,
                   help="fraction of each image-text batch in groups of caption neighbours (in-batch hard negatives)")
    p.add_argument("--hard-negative-group", type=int, default=d["hard_negative_group"].default)
    p.add_argument("--caption-positives", action=argparse.BooleanOptionalAction, default=None,
                   help="pairs whose captions are identical in a batch are positives of each other, not negatives "
                        "(default: the model's setting, off: plain CLIP / SigLIP pairs)")
    p.add_argument("--hflip-map", default=None, metavar="MAP",
                   help="flip clips and relabel: 'a:b,c:d' (symmetric), a JSON object or a JSON file; replaces "
                        "ROOT/augment.json's 'hflip'. Nothing declared: no flips")
    p.add_argument("--reverse-map", default=None, metavar="MAP", help="time reversal with relabelling, as --hflip-map")
    p.add_argument("--no-hflip", nargs="*", default=[], metavar="CLASS", help="classes never flipped")
    p.add_argument("--no-reverse", nargs="*", default=[], metavar="CLASS", help="classes never reversed")
    p.add_argument("--p-hflip", type=float, default=d["p_hflip"].default)
    p.add_argument("--p-reverse", type=float, default=d["p_reverse"].default)
    p.add_argument("--temporal-jitter", action=argparse.BooleanOptionalAction, default=None,
                   help="TSN random segment offsets every step (default: the recipe's choice)")
    p.add_argument("--speed-min", type=float, default=None,
                   help="frame-rate jitter: each clip plays a random span of SPEED_MIN..1 of its length (1 = off; "
                        "default: the recipe's choice)")
    p.add_argument("--crop-min-area", type=float, default=None,
                   help="random resized crops covering at least this share of the frame (1 = off; default: recipe)")
    p.add_argument("--image-crop-min-area", type=float, default=d["image_crop_min_area"].default, metavar="AREA",
                   help="image-text pairs: a random resized crop per image covering AREA..1 of it each step "
                        "(open_clip's 0.9; default 1: off)")
    p.add_argument("--image-rotate", type=float, default=d["image_rotate"].default, metavar="DEG",
                   help="image-text pairs: a random rotation within +-DEG degrees each step (default 0: off)")
    p.add_argument("--recipe", choices=("auto", "off"), default="off",
                   help="auto: pick augmentation, regularisation, EMA and length from the clips per class (the "
                        "choices go to OUT/setup.json and the first log record); off (default, until a "
                        "benchmark shows the recipe helps): plain defaults")
    p.add_argument("--label-smoothing", type=float, default=None, help="video classification label smoothing")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth of the video encoder")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="EMA of the weights (0 = off)")
    p.add_argument("--epochs", type=float, default=None, help="cap on passes over the training clips")
    p.add_argument("--freeze", choices=("none", "backbone"), default=None,
                   help="backbone: train only the video classifier (linear probe, head started from the class "
                        "prompts) for very small sets")
    p.add_argument("--video-init", choices=("auto", "image", "keep"), default="auto",
                   help="start the video encoder from the image encoder (auto: when the checkpoint was trained on "
                        "pairs but not videos)")
    p.add_argument("--video-diff-init", choices=DIFF_INITS, default=d["video_diff_init"].default,
                   help="where an inflated video stem's frame-difference weights start: pixels (default: at the "
                        "pixels' weights) or zero (blind to motion at the start)")
    p.add_argument("--mixup", type=float, default=d["mixup"].default, help="mixup alpha for clips (0 = off)")
    p.add_argument("--cutmix", type=float, default=d["cutmix"].default, help="cutmix alpha for clips (0 = off)")
    p.add_argument("--no-video-text", action="store_true", help="no video <-> class-prompt contrastive loss")
    p.add_argument("--curriculum", action="store_true", help="expert curriculum: dense routing annealed to top-k")
    p.add_argument("--curriculum-steps", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the model's)")
    p.add_argument("--val-pairs", default=None, metavar="CSV", help="held-out pairs for Recall@K during training")
    p.add_argument("--val-videos", default=None, metavar="DIR_OR_CSV", help="held-out videos for top-1/top-5")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also save the training state every STEPS steps (default 0: by time only)")
    p.add_argument("--checkpoint-minutes", type=float, default=d["checkpoint_minutes"].default, metavar="MIN",
                   help="save the training state every MIN minutes (default %(default)s; 0: only at the end)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=d["num_workers"].default)
    p.add_argument("--image-col", default="filepath")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--powersgd-rank", type=int, default=0, help="PowerSGD gradient compression rank (DDP)")
    p.add_argument("--powersgd-warmup", type=int, default=d["powersgd_warmup"].default)
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="ddp: replicate the model; fsdp: shard parameters, gradients and optimiser state (FSDP2)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="E",
                   help="spread each MoE layer's experts over groups of E ranks (tokens travel by all-to-all); "
                        "E must divide the number of processes and every layer's (every group's) expert count")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: auto)")
    p.add_argument("--model-overrides", default=None, metavar="JSON", help='e.g. \'{"video_encoder": {"attention": "space_only"}}\'')
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {name: getattr(args, name) for name in _SIMPLE}
    overrides = json.loads(args.model_overrides) if args.model_overrides else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"--model-overrides must be a JSON object, got {args.model_overrides!r}")
    from video.label_maps import parse_map

    values.update(hflip_map=parse_map(args.hflip_map, "--hflip-map") if args.hflip_map else None,
                  reverse_map=parse_map(args.reverse_map, "--reverse-map") if args.reverse_map else None,
                  no_hflip=list(args.no_hflip), no_reverse=list(args.no_reverse),
                  temporal_jitter=args.temporal_jitter)
    return TrainConfig(pairs=list(args.pairs), videos=list(args.videos), resume=args.resume,
                       video_text=not args.no_video_text, curriculum=args.curriculum, model_overrides=overrides,
                       progress=not args.no_progress, **values)
