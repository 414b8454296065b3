"""Run the end-to-end demo as a user would (under a desktop's usual file-handle limit) and record its figures.

Runs ``ernie-vl demo --out OUT`` in a child process whose ``RLIMIT_NOFILE`` is ``--nofile``
(1024 by default, the common desktop limit), then copies the headline of ``OUT/report.json``
into bench/results/demo.md and .json, so the README quotes a script-written file. The demo's
figures are reported, not judged; the one verdict is that the demo finishes under the limit.

    .venv/bin/python bench/demo.py                  # fresh run into runs/demo-bench (~8 min on 2 cores)
    .venv/bin/python bench/demo.py --quick          # the 1-2 minute version
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the packages before bench/ (bench/encoders.py would shadow them)

from _report import Verdict, command_line, machine, write_results  # noqa: E402


def _limit_files(nofile: int):
    def apply() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    return apply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo-bench"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE of the demo process")
    ap.add_argument("--keep", action="store_true", help="reuse finished stages in --out instead of a fresh run")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "ernie_vl", "demo", "--out", str(out)] + (["--quick"] if args.quick else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, preexec_fn=_limit_files(args.nofile), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    headline = report.get("headline", {})
    failed = [s["name"] for s in report.get("stages", []) if s.get("status") not in ("done", "cached")]
    finished = proc.returncode == 0 and bool(headline)
    verdicts = [Verdict(f"`ernie-vl demo{' --quick' if args.quick else ''}` finishes under `ulimit -n {args.nofile}`",
                        "exit 0, every stage done", f"exit {proc.returncode}, {seconds / 60:.1f} min"
                        + (f", stages not done: {', '.join(failed)}" if failed else ""), finished and not failed)]
    for label, value in headline.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        verdicts.append(Verdict(f"demo: {label}", "report", shown, None))
    facts = machine(load_before)
    lines = ["# The demo, run as a user would", "", f"Command: `{command_line('demo.py')}`", "", facts.line(), "",
             f"`ernie-vl demo{' --quick' if args.quick else ''}` in a process limited to {args.nofile} open files; "
             f"exit code {proc.returncode} after {seconds / 60:.1f} minutes. Headline of its `report.json`:", "",
             "| result | value |", "|---|---:|"]
    lines += [f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |"
              for label, value in headline.items()]
    if report.get("stages"):
        lines += ["", "Stages: " + ", ".join(f"{s['name']} {s.get('status')}" for s in report["stages"]) + "."]
    write_results("demo", "\n".join(lines), verdicts, facts, command_line("demo.py"))
    print("\n".join(lines))
    sys.exit(0 if finished else 1)


if __name__ == "__main__":
    main()
