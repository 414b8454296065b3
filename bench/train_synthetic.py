"""The model must learn: the `tiny` preset trained on the synthetic data within a time budget.

Generates captioned shapes (held-out split = unseen colour-shape combinations) and
motion-action clips, trains ``tiny`` (divided space-time video encoder, frame-difference conv tokenizer;
image conv tokenizer) for ``--minutes`` of wall clock, then the same model with a ``space_only`` video
encoder the same way, then ``ernie45-tiny`` (tiny's encoders with ERNIE 4.5 VL's layout: text / vision
expert groups, shared expert, score-bias balancing, the variable-resolution resampler), and reports:
held-out Recall@1/5/10 both ways, motion top-1/top-5 supervised and zero-shot (class prompts), training
throughput and seconds per step, and the routing statistics at the end (per-modality expert usage, overlap
rate, activated-parameter ratio, active-head ratio) from one held-out forward. Goals (issue 5):
text->image R@1 >= 0.8 on unseen combinations, motion top-1 >= 0.95 supervised, in 10 minutes.
On request (``--only``): ``divided_linear`` (tiny with the linear tubelet embedding), ``ernie45_linear`` /
``ernie45_stem`` (ernie45-tiny with the linear embeddings / tiny's conv tokenizers named explicitly).

    .venv/bin/python bench/train_synthetic.py [--quick] [--minutes 10] [--max-steps N] [--only NAME ...]
        [--save-dir DIR]

``--minutes 0 --max-steps N`` is a fixed-step run (no wall-clock budget), for shared machines.
Each variant's run is kept as one row of ``bench/results/<out>_rows.json`` (a rerun replaces it); the
Markdown and the verdicts (``_report.write_results``; goals on ``divided``) come from all rows.
Each row records the encoders it trained; a row whose encoders are not what its variant builds now (a preset
changed since: ``ENCODERS_CHANGED`` dates rows from before rows recorded them) is marked stale and has no verdict.
``--save-dir DIR`` copies each trained checkpoint to ``DIR/<variant>`` (``bench/int8_accuracy.py`` reads it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import Verdict, command_line, machine, write_results  # noqa: E402
from _work import WORK_HELP, work_folder  # noqa: E402
from ernie_vl.data.synthetic import make_motion, make_shapes  # noqa: E402
from ernie_vl.train import TrainConfig  # noqa: E402
from ernie_vl.train.reporting import routing_summary  # noqa: E402
from ernie_vl.train.trainer import Trainer  # noqa: E402


# ``space_only`` is the frame-wise encoder: no temporal attention *and* one-frame patches
# (tubelet_size 1), so time enters nowhere before the pooling; with the preset's 4-frame
# tubelets the patch embedding itself would already see motion.
VARIANTS = {"divided": ("tiny", {}),
            # tiny's video encoder before the frame-difference conv tokenizer became its default
            "divided_linear": ("tiny", {"video_encoder": {"conv_stem": 0}}),
            "space_only": ("tiny", {"video_encoder": {"attention": "space_only", "tubelet_size": 1}}),
            "ernie45": ("ernie45-tiny", {}),
            # ernie45-tiny's encoders named explicitly, whatever the preset says: the linear patch and tubelet
            # embeddings, or tiny's two conv tokenizers (image, and frame-difference video)
            "ernie45_linear": ("ernie45-tiny", {"image_encoder": {"conv_stem": 0}, "video_encoder": {"conv_stem": 0}}),
            "ernie45_stem": ("ernie45-tiny", {"image_encoder": {"conv_stem": [16, 32, 64]},
                                              "video_encoder": {"conv_stem": {"channels": [16, 32, 64],
                                                                              "frame_diff": True}}})}
ON_REQUEST = {"divided_linear", "ernie45_linear", "ernie45_stem"}  # run with --only only


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


def encoders_of(cfg) -> dict:
    """The image and video encoder configs of an ``ErnieVLConfig`` as JSON values (what a row records)."""
    d = cfg.to_dict()
    return json.loads(json.dumps({"image_encoder": d["image_encoder"], "video_encoder": d["video_encoder"]}))


def expected_encoders(name: str) -> dict:
    """The encoders variant ``name`` builds now (its preset with its overrides)."""
    from ernie_vl.presets import load_config

    model, overrides = VARIANTS[name]
    return encoders_of(load_config(model, **overrides))


#: when the encoders a variant builds last changed (UTC, as rows write it): a row written before then that did not
#: record its encoders ran other ones (rows record them since, and the record is compared instead)
ENCODERS_CHANGED = {"divided": "2026-12-08 01:41 UTC", "divided_linear": "2026-12-08 01:41 UTC",
                    "space_only": "2026-12-08 01:41 UTC", "ernie45": "2026-12-08 04:05 UTC"}


def stale_reason(row: dict) -> str | None:
    """Why a stored row is not what its variant builds now (a preset changed since it ran), or None."""
    name = row["name"]
    if name not in VARIANTS:
        return "a variant that no longer exists"
    if "encoders" in row:
        return None if row["encoders"] == expected_encoders(name) else "ran other encoders than the variant builds now"
    changed = ENCODERS_CHANGED.get(name)
    return f"ran before the variant's encoders changed ({changed})" if changed and row["written"] < changed else None


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
            "s_per_step": result.seconds / result.steps if result.steps else None,
            "encoders": encoders_of(trainer.model.cfg),
            "samples_per_s": result.samples_per_s, "threads": torch.get_num_threads(),
            "metrics": metrics, "routing": final_routing(trainer), "curve": trainer.evaluations}


def fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "n/a" if x is None else str(x)


#: the goals of issue 5, checked on the ``divided`` variant (the `tiny` preset as shipped) trained for the
#: goal's budget (GOAL_MINUTES of wall clock); a shorter run (e.g. fixed steps) is reported without a verdict
GOALS = {"text_to_image_R@1": 0.8, "video_top1": 0.95}
GOAL_MINUTES = 10.0
GOAL_VARIANT = "divided"
METRIC_KEYS = ["text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1",
               "image_to_text_R@5", "image_to_text_R@10", "video_top1", "video_top5", "video_zeroshot_top1",
               "video_zeroshot_top5"]


def budget_text(minutes: float | None, max_steps: int | None) -> str:
    """'10 min' / '100 steps' / '10 min, <= 2000 steps': the budget of one variant's run."""
    parts = ([f"{minutes:g} min"] if minutes else []) + ([f"<= {max_steps} steps" if minutes else f"{max_steps} steps"]
                                                         if max_steps else [])
    return ", ".join(parts) or "no budget"


def row_record(run: dict, args, load_before: float, command: str) -> dict:
    """What the rows file keeps of one variant's run: its figures, budget, load and command."""
    return {**run, "budget": budget_text(args.minutes, args.max_steps), "minutes": args.minutes or 0.0,
            "clips_per_class": args.clips_per_class, "seed": getattr(args, "seed", None),
            "load_before": load_before, "load_after": os.getloadavg()[0], "command": command,
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def load_rows(path: Path) -> dict[str, dict]:
    """variant name -> its latest row (a rerun of a variant replaces its row)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def verdicts(rows: dict[str, dict]) -> list:
    """Goal rows for the ``divided`` variant when it had the goal's budget, every other headline figure reported."""
    out = []
    for name in VARIANTS:
        r = rows.get(name)
        if r is None:
            continue
        stale = stale_reason(r)
        m, where = r["metrics"], f"`{name}`, {r['budget']}, load {r['load_before']:.1f}-{r['load_after']:.1f}"
        where += f" (stale: {stale})" if stale else ""
        for key, label in (("text_to_image_R@1", "held-out text->image R@1 (unseen colour-shape combinations)"),
                           ("video_top1", "motion top-1, supervised")):
            goal = GOALS[key] if name == GOAL_VARIANT and r.get("minutes", 0) >= GOAL_MINUTES and not stale else None
            value = m.get(key)
            out.append(Verdict(f"train_synthetic {label}, {where}", f">= {goal}" if goal is not None else "report",
                               fmt(value), None if goal is None or value is None else bool(value >= goal)))
        out.append(Verdict(f"train_synthetic motion top-1, zero-shot (class prompts), {where}", "report",
                           fmt(m.get("video_zeroshot_top1")), None))
    return out


def write_report(path: Path, rows: dict[str, dict], data_s: float, args, command: str) -> str:
    """The Markdown of every stored variant row (this run's and earlier ones'), written to ``path``."""
    runs = [rows[n] for n in VARIANTS if n in rows]
    lines = [
        "# Training on synthetic data: does `tiny` learn?"
        + ("" if args.minutes else f" (short fixed-step run: {args.max_steps} steps per variant)"),
        "",
        "Each variant's row comes from the latest run of that variant (a rerun replaces its row); the command, "
        "budget and load of each are in the table. The latest invocation:",
        "",
        "```",
        f"$ {command}",
        "```",
        "",
        "Data (generated outside the budget" + (f", in {data_s:.1f} s" if data_s else "") + "): captioned shapes 32 px, 5000 for training, "
        "held-out = 200 images whose captions are unique and use colour-shape combinations never seen in training; "
        "motion clips 8 frames 32 px, 8 classes, the row's training clips per class and 16 held-out clips per class. "
        "A wall-clock budget counts model build, data caching and training.",
        "Variants: `divided` = the `tiny` preset (divided space-time attention, 4-frame x 8 px tubelets, embedded "
        "by its conv tokenizer fed the frames and their differences; images by its 2D conv tokenizer); "
        "`divided_linear` = the same with the linear tubelet embedding instead (`conv_stem=0`, tiny's video encoder "
        "before the tokenizer became its default); `space_only` = the same model with a frame-wise video encoder "
        "(no temporal attention, 1-frame patches: time enters nowhere before pooling); `ernie45` = the "
        "`ernie45-tiny` preset: `tiny`'s encoders, conv tokenizers included, with the backbone and aligners built "
        "the ERNIE 4.5 VL way (text and vision expert groups with their own routers at ERNIE 4.5's 3:1 width "
        "ratio, a shared expert, score-bias balancing, the variable-resolution resampler as aligner), so against "
        "`divided` it compares the backbone and aligners alone; `ernie45_linear` / `ernie45_stem` = `ernie45-tiny` "
        "with its encoders named explicitly: the linear patch and tubelet embeddings (the preset's encoders before "
        f"{ENCODERS_CHANGED['ernie45']}) / tiny's two conv tokenizers (the preset's since).",
        "Machine: 2 CPU cores; the 1-minute load average before and after each run is in its column (this run's own "
        "2 threads make ~2; more means other jobs shared the cores and a wall-clock budget got fewer steps). "
        "CPU seconds are the process's own. Goals (`divided` trained for "
        f"{GOAL_MINUTES:g} minutes; shorter runs are reported): " + ", ".join(f"{k} >= {v}" for k, v in GOALS.items())
        + ".",
        "",
        "| metric | goal | " + " | ".join(r["name"] + (" (stale)" if stale_reason(r) else "") for r in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for k in METRIC_KEYS:
        goal = f">= {GOALS[k]}" if k in GOALS else ""
        lines.append(f"| {k} | {goal} | " + " | ".join(fmt(r["metrics"].get(k)) for r in runs) + " |")
    for k, label in (("budget", "budget"), ("seed", "seed"), ("clips_per_class", "training clips per class"),
                     ("steps", "optimiser steps"), ("s_per_step", "s per optimiser step (training loop only)"),
                     ("samples_per_s", "training samples/s"), ("threads", "torch threads"),
                     ("setup_s", "setup s (model, data decoding/cache)"),
                     ("train_wall_s", "wall s (setup + training + final save/eval)"), ("cpu_s", "CPU s of this process"),
                     ("load", "1-min load before / after"), ("written", "measured")):
        values = [f"{r['load_before']:.1f} / {r['load_after']:.1f}" if k == "load" else fmt(r.get(k)) for r in runs]
        lines.append(f"| {label} | | " + " | ".join(values) + " |")
    stale = [f"`{r['name']}`: {stale_reason(r)}" for r in runs if stale_reason(r)]
    if stale:
        lines += ["", "Stale rows (not what the variant builds now; reported without a verdict): " + "; ".join(stale)
                  + "."]
    lines += ["", "Commands: " + "; ".join(f"`{r['name']}`: `{r['command']}`" for r in runs), ""]
    lines += ["Routing at the end (one eval forward on held-out images + captions + clips; mean over MoE layers):", ""]
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
    return "\n".join(lines) + "\n"


def save_checkpoint(run_dir: Path, save_dir: Path, name: str) -> Path:
    """Copy the trained model of ``run_dir`` (its ``final/`` folder) to ``save_dir/name`` (replaced whole)."""
    src, dst = run_dir / "final", save_dir / name
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no trained model in {str(src)!r} to save")
    tmp = save_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


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
    p.add_argument("--work", default=None, help=WORK_HELP)
    p.add_argument("--save-dir", default=None,
                   help="copy each variant's trained checkpoint to SAVE_DIR/<variant> (e.g. for bench/int8_accuracy.py)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the Markdown and the verdicts from the stored rows")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_synthetic.md"),
                   help="results Markdown; its .json (verdicts) and _rows.json (one row per variant) go beside it")
    args = p.parse_args()
    with work_folder(args.work, "ernie_train_synthetic-") as work:
        args.work = str(work)
        if args.quick:
            args.minutes, args.clips_per_class = 1.0, 16
        if not args.minutes and not args.max_steps:
            p.error("--minutes 0 needs --max-steps N (a run needs a budget)")
        load_before = os.getloadavg()[0]
        command = command_line("train_synthetic.py")
        out = Path(args.out)
        rows_path = out.with_name(f"{out.stem}_rows.json")
        data, data_s = ({}, 0.0) if args.report_only else make_data(Path(args.work) / "data", args.quick,
                                                                     args.clips_per_class)
        for name, (model, overrides) in VARIANTS.items():
            if args.report_only or (name not in args.only if args.only else name in ON_REQUEST):
                continue
            run_load = os.getloadavg()[0]
            run = train_variant(name, data, args, overrides, model)
            print(json.dumps({k: v for k, v in run.items() if k not in ("routing", "curve")}), flush=True)
            if args.save_dir:
                print(f"saved {name}: {save_checkpoint(Path(args.work) / name, Path(args.save_dir), name)}", flush=True)
            rows = load_rows(rows_path)  # read again: another variant's run may have written since
            rows[name] = row_record(run, args, run_load, command)
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            rows_path.write_text(json.dumps(rows, indent=1) + "\n")  # each finished variant is kept at once
        rows = load_rows(rows_path)
        text = write_report(out, rows, data_s, args, command)
        write_results(out.stem, text, verdicts(rows), machine(load_before), command, results_dir=out.parent)
        print(text)


if __name__ == "__main__":
    main()
