"""MoE load balancing on `tiny` training: score-bias only vs the load-balance loss vs both.

Trains the `tiny` preset on the synthetic data of ``bench/train_synthetic.py`` once per variant:

- ``bias_only``: aux-loss-free balancing (ERNIE 4.5 / DeepSeek-V3): a per-expert score bias used
  for selection only, ``bias += gamma * sign(mean_load - load)`` after each optimiser step; no
  load-balance loss;
- ``lb_loss``: the Switch load-balance loss at `tiny`'s coefficient, no bias (the preset as is);
- ``both``: the loss and the bias;
- ``none`` (optional control): neither.

and reports from the per-step training logs: the coefficient of variation (std / mean) of the
expert load per MoE layer over time, the share of assignments that a capacity factor of 1.0
would drop (``ceil(N * k / E)`` slots per expert), the text-vision expert overlap (brief claim 4:
"overlap falls to 18%"), and at the end held-out text->image R@1 and motion top-1.

    .venv/bin/python bench/moe_balance.py [--minutes 10] [--steps N] [--variants ...] [--gamma 0.001]

``--minutes 0 --steps N`` runs fixed steps (for a shared machine).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ (the script's folder), whose encoders.py would shadow the package
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))

from _report import Verdict, command_line, machine, verdict_lines, write_results  # noqa: E402
from _work import WORK_HELP, work_folder  # noqa: E402
from train_synthetic import make_data, train_variant  # noqa: E402

from ernie_vl.train import TrainConfig  # noqa: E402

OVERLAP_CLAIM = 0.18  # brief claim 4


def variants(gamma: float, lb_coef: float) -> dict[str, dict]:
    def moe(**kw) -> dict:
        return {"backbone": {"moe": kw}}

    return {"bias_only": moe(load_balance_coef=0.0, bias_gamma=gamma),
            "lb_loss": moe(load_balance_coef=lb_coef),
            "both": moe(load_balance_coef=lb_coef, bias_gamma=gamma),
            "none": moe(load_balance_coef=0.0)}


def load_cv(load: list[float]) -> float:
    a = np.asarray(load, dtype=np.float64)
    return float(a.std() / a.mean()) if a.mean() > 0 else 0.0


def dropped_at_capacity(load: list[float], factor: float = 1.0) -> float:
    """Share of the assignments over ``ceil(factor * assignments / E)`` per expert."""
    a = np.asarray(load, dtype=np.float64)
    total = a.sum()
    if total == 0:
        return 0.0
    cap = math.ceil(factor * total / a.size)
    return float(np.clip(a - cap, 0, None).sum() / total)


def step_series(log_path: Path) -> list[dict]:
    """Per training step: mean over MoE layers of load CV, capacity-1.0 drop share and overlap."""
    rows = []
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        layers = (rec.get("routing") or {}).get("layers") or []
        if "step" not in rec or not layers:
            continue
        overlaps = [l["overlap_rate"] for l in layers if l.get("overlap_rate") is not None]
        rows.append({"step": rec["step"],
                     "cv": float(np.mean([load_cv(l["tokens_per_expert"]) for l in layers])),
                     "drop": float(np.mean([dropped_at_capacity(l["tokens_per_expert"]) for l in layers])),
                     "overlap": float(np.mean(overlaps)) if overlaps else float("nan")})
    return rows


def windows(rows: list[dict], n: int = 5) -> list[dict]:
    """``n`` equal step windows: mean CV, drop share and overlap in each."""
    if not rows:
        return []
    parts = np.array_split(np.arange(len(rows)), min(n, len(rows)))
    out = []
    for idx in parts:
        sel = [rows[i] for i in idx]
        out.append({"steps": f"{sel[0]['step']}-{sel[-1]['step']}",
                    **{k: float(np.nanmean([r[k] for r in sel])) for k in ("cv", "drop", "overlap")}})
    return out


def final_summary(run: dict) -> dict:
    layers = run["routing"].get("layers") or []
    return {"cv": float(np.mean([load_cv(l["tokens_per_expert"]) for l in layers])),
            "drop": float(np.mean([dropped_at_capacity(l["tokens_per_expert"]) for l in layers])),
            "overlap": run["routing"].get("overlap_rate")}


def fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report(runs: list[dict], args, facts, data_s: float) -> tuple[str, list[Verdict]]:
    budget = (f"{args.minutes} min wall clock" if args.minutes else "no wall-clock budget") + (
        f", at most {args.steps} steps" if args.steps else "")
    lines = [
        "# MoE balancing: score bias vs load-balance loss (`tiny`)" + ("" if args.minutes else
                                                                     f" — short fixed-step run ({args.steps} steps)"),
        "", "```", "$ " + command_line("moe_balance.py"), "```", "",
        f"Budget per variant: {budget}; batch {args.batch_pairs} pairs + {args.batch_videos} clips per step; "
        f"bias step gamma {args.gamma}, load-balance coefficient {args.lb_coef}; data as in `train_synthetic` "
        f"({args.clips_per_class} clips per class, generated in {data_s:.0f} s outside the budget).",
        facts.line() + " The machine was shared with other jobs: step counts under a wall-clock budget would be "
        "pessimistic, which is why a fixed-step budget is used there.", "",
        "Load CV = std / mean of the assignments per expert (0 = perfectly even), mean over the MoE layers; "
        "drop@1.0 = share of assignments a capacity factor of 1.0 would drop; overlap = text-vision expert "
        "overlap (histogram intersection of the usage distributions, 1 = same experts).", "",
        "| variant | steps | load CV (last window) | drop@1.0 (last window) | overlap (last window) | "
        "held-out load CV | held-out drop@1.0 | held-out overlap | text->image R@1 | motion top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        w, f, m = r["windows"][-1] if r["windows"] else {}, r["final"], r["metrics"]
        lines.append(f"| {r['name']} | {r['steps']} | {fmt(w.get('cv'))} | {fmt(w.get('drop'))} | "
                     f"{fmt(w.get('overlap'))} | {fmt(f['cv'])} | {fmt(f['drop'])} | {fmt(f['overlap'])} | "
                     f"{fmt(m.get('text_to_image_R@1'))} | {fmt(m.get('video_top1'))} |")
    lines += ["", "Over time (training batches; windows of equal step counts): load CV / drop@1.0 / overlap", "",
              "| variant | " + " | ".join(f"steps {w['steps']}" for w in runs[0]["windows"]) + " |",
              "|---|" + "---|" * len(runs[0]["windows"])]
    for r in runs:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{fmt(w['cv'], 2)} / {fmt(w['drop'], 2)} / {fmt(w['overlap'], 2)}" for w in r["windows"]) + " |")
    by = {r["name"]: r for r in runs}
    verdicts = []
    if "bias_only" in by and "lb_loss" in by:
        b, l = by["bias_only"]["windows"][-1]["cv"], by["lb_loss"]["windows"][-1]["cv"]
        verdicts.append(Verdict("MoE balance: load CV, score bias alone vs load-balance loss (last window)",
                                "bias <= loss", f"{b:.3f} vs {l:.3f}", b <= l))
    for r in runs:
        ov = r["final"]["overlap"]
        verdicts.append(Verdict(f"MoE balance ({r['name']}): text-vision expert overlap at the end", f"<= {OVERLAP_CLAIM}",
                                fmt(ov), None if ov is None else ov <= OVERLAP_CLAIM, claim="4"))
    lines += ["", "Verdicts (computed by the script):", ""]
    lines += verdict_lines(verdicts)
    return "\n".join(lines) + "\n", verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall clock per variant (0: --steps only)")
    p.add_argument("--steps", type=int, default=None, help="at most this many optimiser steps per variant")
    p.add_argument("--variants", nargs="+", default=["bias_only", "lb_loss", "both"],
                   choices=["bias_only", "lb_loss", "both", "none"])
    p.add_argument("--gamma", type=float, default=0.001, help="score-bias step")
    p.add_argument("--lb-coef", type=float, default=0.01, help="load-balance loss coefficient (tiny's)")
    p.add_argument("--batch-pairs", type=int, default=64)
    p.add_argument("--batch-videos", type=int, default=32)
    p.add_argument("--clips-per-class", type=int, default=512)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help=WORK_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--results", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    with work_folder(args.work, "ernie_moe_balance-") as work:
        args.work = str(work)
        if not args.minutes and not args.steps:
            p.error("give --minutes > 0 and/or --steps")
        args.max_steps = args.steps
        load_before = os.getloadavg()[0]
        data, data_s = make_data(Path(args.work) / "data", False, args.clips_per_class)
        table = variants(args.gamma, args.lb_coef)
        runs = []
        for name in args.variants:
            shutil.rmtree(Path(args.work) / name, ignore_errors=True)  # a fresh run per variant
            run = train_variant(name, data, args, table[name])
            run["windows"] = windows(step_series(Path(args.work) / name / "log.jsonl"))
            run["final"] = final_summary(run)
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("name", "steps", "final", "windows")}), flush=True)
        facts = machine(load_before)
        text, verdicts = report(runs, args, facts, data_s)
        write_results("moe_balance", text, verdicts, facts, command_line("moe_balance.py"),
                      Path(args.results) if args.results else None)
        print(text)


if __name__ == "__main__":
    main()
