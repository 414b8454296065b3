"""Training screens: short fixed-step runs of `tiny` that compare training settings on one task at a time.

Each variant trains either on the captioned shapes alone (image-text; reports held-out
text->image / image->text Recall@1 on unseen colour-shape combinations) or on the motion
clips alone (reports supervised and zero-shot top-1), for ``--steps`` optimiser steps on
``--threads`` threads, from the same seed. A fixed step count makes the figures independent
of the machine's load (only the seconds change), so screens can run beside other jobs. They
pick the defaults of ``TrainConfig`` and of bench/train_synthetic.py; the 10-minute joint run
there is what the goals are measured on. The screens have no goal: their rows are reported.

Rows accumulate: each run adds its rows to bench/results/train_screens_rows.json (a rerun of the
same variant, seed and step count replaces the old row; every row keeps its own date, CPU, load and
command), so the full set can be run in parts with ``--only``; ``--fresh`` starts a new set. The
results file (train_screens.md and .json, ``bench/_report.py``) is written from all rows.

    .venv/bin/python bench/train_screens.py [--steps 300] [--only NAME ...] [--seeds 0 1] [--fresh]
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

from bench._report import RESULTS, Verdict, command_line, machine, write_results  # noqa: E402
from bench.train_synthetic import make_data  # noqa: E402
from ernie_vl.train import TrainConfig  # noqa: E402
from ernie_vl.train.trainer import Trainer  # noqa: E402

ROWS = RESULTS / "train_screens_rows.json"
METRICS = ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_R@5", "video_top1", "video_zeroshot_top1",
           "video_top5")
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


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each row of ``new`` replacing the row of the same variant, seed and step count, in
    VARIANTS order (then seed, then steps)."""
    key = lambda r: (r["name"], r["seed"], r["steps"])  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sorted(merged.values(), key=lambda r: (order.get(r["name"], len(order)), r["name"], r["seed"], r["steps"]))


def best_rows(rows: list[dict]) -> list[Verdict]:
    """Reported rows (no goal): the best variant of each task at each step count."""
    out = []
    for task, metric, label in (("pairs", "text_to_image_R@1", "held-out text->image R@1"),
                                ("videos", "video_top1", "held-out motion top-1")):
        for steps in sorted({r["steps"] for r in rows if r["task"] == task}):
            mine = [r for r in rows if r["task"] == task and r["steps"] == steps]
            best = max(mine, key=lambda r: r[metric])
            out.append(Verdict(f"Training screens, {task} ({steps} steps): best of {len(mine)} run{'s' * (len(mine) > 1)} by {label}",
                               "- (reported)", f"{best[metric]:.3f} (`{best['name']}`, seed {best['seed']})", None))
    return out


def report(rows: list[dict], facts) -> str:
    """The results file: method, one table of every row (each with its own date and load)."""
    cpus = sorted({r["cpu"] for r in rows})
    lines = ["# Training screens (fixed steps, one task at a time)", "",
             "Command: `.venv/bin/python bench/train_screens.py` (every variant, seed 0, 300 steps, 1 thread), run "
             "in parts with `--only`; each row's own command is in `bench/results/train_screens_rows.json`.", "",
             "`tiny`, warm-up 20, cosine to the end; image-text: 64 pairs per step, held-out = 200 unseen colour-shape "
             "combinations; motion: 32 clips per step, 128 held-out clips. Step counts are fixed, so the metrics do "
             "not depend on the machine's load (the seconds do: each row lists the 1-minute load average before and "
             "after it). Held-out sizes make one figure's noise about +-0.035 (R@1) and +-0.04 (top-1).", "",
             f"CPU of the rows: {'; '.join(cpus)}. Last part: " + facts.line(), "",
             "| variant | seed | steps | threads | t2i R@1 | i2t R@1 | t2i R@5 | video top-1 | zero-shot top-1 | "
             "video top-5 | s | load before / after | written |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cells = ["" if r.get(k) is None else f"{r[k]:.3f}" for k in METRICS]
        lines.append(f"| {r['name']} | {r['seed']} | {r['steps']} | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['seconds']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} | {r['written']} |")
    missing = [name for name in VARIANTS if name not in {r["name"] for r in rows}]
    if missing:
        lines += ["", "Not run in this set yet: " + ", ".join(f"`{name}`" for name in missing) + "."]
    verdicts = best_rows(rows)
    lines += ["", "Best per task (reported, no goal):", ""]
    lines += [f"- {v.what}: {v.measured}" for v in verdicts]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS), metavar="NAME",
                   help="variants to run (default: all); names as in VARIANTS")
    p.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the results file from the stored rows (e.g. after an interrupted part)")
    p.add_argument("--quick", action="store_true", help="small data, 20 steps, two variants (a smoke run; its "
                   "results go under --work unless --results is given)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ernie_train_synthetic"))
    p.add_argument("--results", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    if args.quick:
        args.steps, names = 20, args.only or ["pairs uniform lr 5e-4", "videos priority lr 5e-4"]
        args.work = str(Path(args.work) / "quick")
    # a smoke run's rows (other data) never join the real ones
    results = Path(args.results) if args.results else (Path(args.work) / "results" if args.quick else RESULTS)
    rows_file = results / ROWS.name
    old = [] if args.fresh or not rows_file.is_file() else json.loads(rows_file.read_text())
    if args.report_only and not old:
        p.error(f"--report-only: no stored rows in {rows_file.name} under {results}")
    if not args.report_only:
        data, _ = make_data(Path(args.work) / "data", args.quick, clips_per_class=64)  # the screens' 512 clips
    load_first = os.getloadavg()[0]
    rows, all_rows = [], old
    for seed in [] if args.report_only else args.seeds:
        for name in names:
            load_before = os.getloadavg()[0]
            row = run_variant(name, seed, data, args)
            facts = machine(load_before)
            row.update(steps=args.steps, threads=args.threads, cpu=facts.cpu, load_before=facts.load_before,
                       load_after=facts.load_after, written=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       command=command_line("train_screens.py"))
            rows.append(row)
            all_rows = merge_rows(old, rows)  # written after every variant: an interrupted run keeps its rows
            results.mkdir(parents=True, exist_ok=True)
            rows_file.write_text(json.dumps(all_rows, indent=1) + "\n")
            print(json.dumps(row), flush=True)
    facts = machine(load_first)
    text = report(all_rows, facts)
    write_results("train_screens", text, best_rows(all_rows), facts, command_line("train_screens.py"), results)
    print(text)


if __name__ == "__main__":
    main()
