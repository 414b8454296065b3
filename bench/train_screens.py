"""Training screens: short fixed-step runs of `tiny` that compare training settings on one task at a time.

Each variant trains either on the captioned shapes alone (image-text; reports held-out
text->image / image->text Recall@1 on unseen colour-shape combinations) or on the motion
clips alone (reports supervised and zero-shot top-1), for ``--steps`` optimiser steps on
``--threads`` threads, from the same seed. A fixed step count makes the figures independent
of the machine's load (only the seconds change), so screens can run beside other jobs. They
pick the defaults of ``TrainConfig`` and of bench/train_synthetic.py; the 10-minute joint run
there is what the issue's goals are measured on.

    .venv/bin/python bench/train_screens.py [--steps 300] [--only NAME ...] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_synthetic import make_data  # noqa: E402
from ernie_vl.train import TrainConfig  # noqa: E402
from ernie_vl.train.trainer import Trainer  # noqa: E402

SINCOS = {"image_encoder": {"pos_init": "sincos"}}
# name -> (task, model overrides, TrainConfig fields)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "pairs priority lr 2e-3": ("pairs", {}, {"sampler": "priority", "lr": 2e-3}),
    "pairs uniform lr 4e-3": ("pairs", {}, {"sampler": "uniform", "lr": 4e-3}),
    "pairs uniform lr 2e-3": ("pairs", {}, {"sampler": "uniform", "lr": 2e-3}),
    "pairs uniform lr 1e-3": ("pairs", {}, {"sampler": "uniform", "lr": 1e-3}),
    "pairs uniform lr 5e-4": ("pairs", {}, {"sampler": "uniform", "lr": 5e-4}),
    "pairs uniform lr 2.5e-4": ("pairs", {}, {"sampler": "uniform", "lr": 2.5e-4}),
    "pairs uniform lr 2e-3 hard 0.25": ("pairs", {}, {"sampler": "uniform", "lr": 2e-3, "hard_negative_share": 0.25}),
    "pairs uniform lr 2e-3 hard 0.5": ("pairs", {}, {"sampler": "uniform", "lr": 2e-3, "hard_negative_share": 0.5}),
    "pairs uniform lr 2e-3 hard 1.0": ("pairs", {}, {"sampler": "uniform", "lr": 2e-3, "hard_negative_share": 1.0}),
    "pairs uniform lr 1e-3 hard 0.5": ("pairs", {}, {"sampler": "uniform", "lr": 1e-3, "hard_negative_share": 0.5}),
    "pairs uniform lr 5e-4 hard 0.5": ("pairs", {}, {"sampler": "uniform", "lr": 5e-4, "hard_negative_share": 0.5}),
    "pairs uniform lr 2e-3 sincos": ("pairs", SINCOS, {"sampler": "uniform", "lr": 2e-3}),
    "pairs uniform lr 2e-3 sincos hard 0.5": ("pairs", SINCOS, {"sampler": "uniform", "lr": 2e-3,
                                                                "hard_negative_share": 0.5}),
    "videos priority lr 2e-3": ("videos", {}, {"video_sampler": "priority", "lr": 2e-3}),
    "videos uniform lr 2e-3": ("videos", {}, {"video_sampler": "uniform", "lr": 2e-3}),
    "videos uniform lr 1e-3": ("videos", {}, {"video_sampler": "uniform", "lr": 1e-3}),
    "videos uniform lr 5e-4": ("videos", {}, {"video_sampler": "uniform", "lr": 5e-4}),
    "videos priority lr 5e-4": ("videos", {}, {"video_sampler": "priority", "lr": 5e-4}),
    "videos uniform lr 2.5e-4": ("videos", {}, {"video_sampler": "uniform", "lr": 2.5e-4}),
    "videos priority lr 5e-4 tubelet 2": ("videos", {"video_encoder": {"tubelet_size": 2}},
                                          {"video_sampler": "priority", "lr": 5e-4}),
    "videos priority lr 5e-4 tubelet 8": ("videos", {"video_encoder": {"tubelet_size": 8}},
                                          {"video_sampler": "priority", "lr": 5e-4}),
}


def run_variant(name: str, seed: int, data: dict, args) -> dict:
    task, overrides, fields = VARIANTS[name]
    kw = dict(out=str(Path(args.work) / "screens" / f"{name.replace(' ', '_')}_{seed}"), model="tiny",
              model_overrides=overrides, max_steps=args.steps, batch_pairs=64, batch_videos=32, warmup_steps=20,
              num_workers=1, progress=False, threads=args.threads, seed=seed)
    if task == "pairs":
        kw.update(pairs=[str(data["pairs"])], videos=[], val_pairs=str(data["heldout"]))
    else:
        kw.update(pairs=[], videos=[str(data["videos"])], val_videos=str(data["val_videos"]))
    kw.update(fields)
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(**kw))
    result = trainer.run()
    metrics = result.evaluation or trainer.run_evaluation()
    keys = (("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@5") if task == "pairs"
            else ("video_top1", "video_zeroshot_top1", "video_top5"))
    return {"name": name, "task": task, "seed": seed, "seconds": time.perf_counter() - t0,
            **{k: metrics[k] for k in keys}}


def write_report(path: Path, rows: list[dict], args) -> str:
    load = os.getloadavg()
    lines = ["# Training screens (fixed steps, one task at a time)", "", "```",
             "$ .venv/bin/python bench/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "```", "",
             f"`tiny`, {args.steps} optimiser steps, {args.threads} thread(s), warm-up 20, cosine to the end; "
             "image-text: 64 pairs per step, held-out = 200 unseen colour-shape combinations; motion: 32 clips per "
             "step, 128 held-out clips. Step counts are fixed, so the metrics do not depend on the machine's load "
             f"(1-minute load average {load[0]:.1f} at the end; seconds do). Held-out sizes make one figure's "
             "noise about +-0.035 (R@1) and +-0.04 (top-1).", "",
             "| variant | seed | t2i R@1 | i2t R@1 | t2i R@5 | video top-1 | zero-shot top-1 | video top-5 | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r.get(k) for k in ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@5", "video_top1",
                                     "video_zeroshot_top1", "video_top5")]
        lines.append(f"| {r['name']} | {r['seed']} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells)
                     + f" | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS), metavar="NAME",
                   help="variants to run (default: all); names as in VARIANTS")
    p.add_argument("--quick", action="store_true", help="small data, 20 steps, two variants (a smoke run)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ernie_train_synthetic"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_screens.md"))
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    if args.quick:
        args.steps, names = 20, args.only or ["pairs uniform lr 5e-4", "videos priority lr 5e-4"]
        args.work = str(Path(args.work) / "quick")
    data, _ = make_data(Path(args.work) / "data", args.quick, clips_per_class=64)  # the 512 clips the screens used
    rows = []
    for seed in args.seeds:
        for name in names:
            rows.append(run_variant(name, seed, data, args))
            print(json.dumps(rows[-1]), flush=True)
    print(write_report(Path(args.out), rows, args))


if __name__ == "__main__":
    main()
