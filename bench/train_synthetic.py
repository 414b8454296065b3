"""The model must learn: the `tiny` preset trained on the synthetic data within a time budget.

Generates captioned shapes (held-out split = unseen colour-shape combinations) and
motion-action clips, trains ``tiny`` (divided space-time video encoder) for
``--minutes`` of wall clock, then the same model with a ``space_only`` video encoder
the same way, then ``ernie45-tiny`` (ERNIE 4.5 VL's layout: text / vision expert groups,
shared expert, score-bias balancing, the variable-resolution resampler), and reports: held-out Recall@1/5/10 both ways, motion top-1/top-5
supervised and zero-shot (class prompts), training throughput, and the routing
statistics at the end (per-modality expert usage, overlap rate, activated-parameter
ratio, active-head ratio) from one held-out forward. Goals (issue 5): text->image
R@1 >= 0.8 on unseen combinations, motion top-1 >= 0.95 supervised, in 10 minutes.

    .venv/bin/python bench/train_synthetic.py [--quick] [--minutes 10] [--max-steps N] [--only NAME ...]

``--minutes 0 --max-steps N`` is a fixed-step run (no wall-clock budget), for shared machines.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ernie_vl.data.synthetic import make_motion, make_shapes  # noqa: E402
from ernie_vl.train import TrainConfig  # noqa: E402
from ernie_vl.train.trainer import Trainer, routing_summary  # noqa: E402


# ``space_only`` is the frame-wise encoder: no temporal attention *and* one-frame patches
# (tubelet_size 1), so time enters nowhere before the pooling; with the preset's 4-frame
# tubelets the patch embedding itself would already see motion.
VARIANTS = {"divided": ("tiny", {}),
            "space_only": ("tiny", {"video_encoder": {"attention": "space_only", "tubelet_size": 1}}),
            "ernie45": ("ernie45-tiny", {})}


def make_data(root: Path, quick: bool, clips_per_class: int = 256) -> tuple[dict, float]:
    """Captioned shapes (5000 train, 200 held-out) and motion clips (``clips_per_class`` x 8 train, 16 x 8 held
    out; each clip is seeded by its split, class and number, so the held-out clips never depend on the train size)."""
    t0 = time.perf_counter()
    n_train = 1000 if quick else 5000
    clips = 16 if quick else clips_per_class
    shapes, motion = root / "shapes", root / f"motion_{clips}"
    if not (shapes / "heldout.csv").is_file():
        make_shapes(shapes, num_train=n_train, num_val=0, num_heldout=200, image_size=32, seed=0)
    if not (motion / "val" / "prompts.json").is_file():
        make_motion(motion, num_train_per_class=clips, num_val_per_class=16, num_frames=8, size=32, seed=0)
    return ({"pairs": shapes / "train.csv", "heldout": shapes / "heldout.csv",
             "videos": motion / "train", "val_videos": motion / "val", "clips_per_class": clips},
            time.perf_counter() - t0)


@torch.no_grad()
def final_routing(trainer: Trainer) -> dict:
    """Routing statistics of one eval-mode forward on held-out images + captions + clips."""
    from ernie_vl.model import ErnieVLBatch

    model = trainer.model
    model.eval()
    ids = torch.arange(min(64, len(trainer.val_pairs)))
    images, texts = trainer.val_pairs.batch(ids)
    vids = torch.arange(min(32, len(trainer.val_videos)))
    batch = ErnieVLBatch(images=images, texts=texts, videos=trainer.val_videos.norm.to_float(trainer.val_videos.clips[vids]),
                         video_labels=trainer.val_videos.labels[vids])
    out = model(batch)
    return routing_summary(out.routing, out.active_head_ratio)


def train_variant(name: str, data: dict, args, overrides: dict, model: str = "tiny") -> dict:
    cfg = TrainConfig(out=str(Path(args.work) / name), model=model, model_overrides=overrides,
                      pairs=[str(data["pairs"])], videos=[str(data["videos"])], val_pairs=str(data["heldout"]),
                      val_videos=str(data["val_videos"]), minutes=args.minutes or None, max_steps=args.max_steps,
                      batch_pairs=args.batch_pairs, batch_videos=args.batch_videos, lr=args.lr,
                      warmup_steps=args.warmup, num_workers=1, progress=not args.no_progress, threads=args.threads,
                      seed=args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - t0
    result = trainer.run()
    train_wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    metrics = result.evaluation or trainer.run_evaluation()
    return {"name": name, "model": model, "steps": result.steps, "setup_s": setup, "train_wall_s": train_wall, "cpu_s": cpu,
            "samples_per_s": result.samples_per_s, "threads": torch.get_num_threads(),
            "metrics": metrics, "routing": final_routing(trainer), "curve": trainer.evaluations}


def fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_report(path: Path, runs: list[dict], data_s: float, args) -> str:
    load = os.getloadavg()
    keys = ["text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@5",
            "image_to_text_R@10", "video_top1", "video_top5", "video_zeroshot_top1", "video_zeroshot_top5"]
    lines = [
        "# Training on synthetic data: does `tiny` learn?"
        + ("" if args.minutes else f" (short fixed-step run: {args.max_steps} steps per variant)"),
        "",
        "```",
        "$ .venv/bin/python bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "```",
        "",
        f"Data (generated in {data_s:.1f} s, outside the budget): captioned shapes 32 px, 5000 for training, "
        "held-out = 200 images whose captions are unique and use colour-shape combinations never seen in training; "
        f"motion clips 8 frames 32 px, 8 classes, {args.clips_per_class} training and 16 held-out clips per class. "
        "Budget per variant: "
        + (f"{args.minutes} min wall clock (model build, data caching and training)" if args.minutes
           else "no wall-clock budget")
        + (f", at most {args.max_steps} steps" if args.max_steps else "") + ".",
        "Variants: `divided` = the `tiny` preset (divided space-time attention, 4-frame x 8 px tubelets); "
        "`space_only` = the same model with a frame-wise video encoder (no temporal attention, 1-frame patches: "
        "time enters nowhere before pooling); `ernie45` = the `ernie45-tiny` preset (text and vision expert groups "
        "with their own routers at ERNIE 4.5's 3:1 width ratio, a shared expert, score-bias balancing, the "
        "variable-resolution resampler as aligner).",
        f"**Machine: 2 CPU cores, 1/5/15-minute load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end** "
        "(this run's own 2 threads make ~2; more means other jobs shared the cores and the step counts are "
        "pessimistic). CPU seconds are this process's own.",
        "",
        "| metric | goal | " + " | ".join(r["name"] for r in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    goals = {"text_to_image_R@1": ">= 0.8", "video_top1": ">= 0.95"}
    for k in keys:
        lines.append(f"| {k} | {goals.get(k, '')} | " + " | ".join(fmt(r["metrics"].get(k)) for r in runs) + " |")
    for k, label in (("steps", "optimiser steps"), ("samples_per_s", "training samples/s"), ("threads", "torch threads"),
                     ("setup_s", "setup s (model, data decoding/cache)"),
                     ("train_wall_s", "wall s (setup + training + final save/eval)"), ("cpu_s", "CPU s of this process")):
        lines.append(f"| {label} | | " + " | ".join(fmt(r[k]) for r in runs) + " |")
    lines += ["", "Routing at the end (one eval forward on held-out images + captions + clips; mean over MoE layers):", ""]
    for r in runs:
        ro = r["routing"]
        usage = ro.get("usage_by_modality")
        lines += [f"- **{r['name']}**: overlap rate (text vs visual) {fmt(ro.get('overlap_rate'))}, "
                  f"activated-parameter ratio {fmt(ro.get('activated_param_ratio'))}, router entropy "
                  f"{fmt(ro.get('router_entropy'))}; expert usage text / image / video: "
                  + (" / ".join("[" + ", ".join(f"{u:.2f}" for u in row) + "]" for row in usage) if usage else "n/a")
                  + f"; active-head ratio {json.dumps(ro.get('active_head_ratio'))}"]
    if any(r["curve"] for r in runs):
        lines += ["", "Evaluation during training (step: metrics):", "", "```"]
        for r in runs:
            for e in r["curve"]:
                lines.append(f"{r['name']} step {e['step']}: t2i R@1 {e.get('text_to_image_R@1', 0):.3f}, "
                             f"video top-1 {e.get('video_top1', 0):.3f}, zero-shot {e.get('video_zeroshot_top1', 0):.3f}")
        lines += ["```"]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, 1 minute per variant")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per variant (0: steps only)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-pairs", type=int, default=64)
    p.add_argument("--batch-videos", type=int, default=32)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="default: auto (1 on an oversubscribed machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips-per-class", type=int, default=512, help="training motion clips per class")
    p.add_argument("--only", choices=tuple(VARIANTS), nargs="+", default=None)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ernie_train_synthetic"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_synthetic.md"))
    args = p.parse_args()
    if args.quick:
        args.minutes, args.clips_per_class = 1.0, 16
    data, data_s = make_data(Path(args.work) / "data", args.quick, args.clips_per_class)
    runs = []
    for name, (model, overrides) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        runs.append(train_variant(name, data, args, overrides, model))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("routing", "curve")}), flush=True)
    print(write_report(Path(args.out), runs, data_s, args))


if __name__ == "__main__":
    main()
