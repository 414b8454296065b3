"""``ernie-vl demo``: the whole system end to end in one command (data, training, evaluation, search,
video classification, int8), with a progress bar per stage, report.html and a summary table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo (about 10 minutes on 2 CPU cores)",
        description="Generate synthetic data, train the tiny ErnieVL, evaluate retrieval and action "
                    "recognition, build a search index, classify videos, quantize to int8, and write "
                    "report.json / report.html, figures and the trained checkpoint into --out. A rerun "
                    "with the same --out reuses the stages that already finished.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time budget in minutes, data loading included (default 7; 2 with "
                        "--quick, which also stops at 40 steps); the other stages add about 2-3 minutes")
    p.add_argument("--quick", action="store_true",
                   help="small data and a short training: a 1-2 minute run to see everything work")
    p.add_argument("--model", default=None, help="preset to train (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="also stop training after this many steps")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in --out and run every stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.demo import DemoConfig, run_demo

    overrides: dict = {"seed": args.seed, "show_progress": not args.no_progress}
    if args.minutes is not None:
        if args.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {args.minutes}")
        overrides["train_minutes"] = args.minutes
    if args.model:
        overrides["model"] = args.model
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
        overrides["max_train_steps"] = args.max_steps
    cfg = DemoConfig.quick(args.out, **overrides) if args.quick else DemoConfig(out_dir=args.out, **overrides)
    try:
        report = run_demo(cfg, resume=not args.fresh)
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume (finished stages are kept in {args.out})",
              file=sys.stderr)
        return 130
    failed = [s["name"] for s in report["stages"] if s["status"] == "failed"]
    print(f"\nreport: {Path(report['out_dir']) / 'report.html'}")
    return 1 if failed else 0
