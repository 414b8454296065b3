"""What every benchmark writes: the machine it ran on and the verdicts its script computed.

A benchmark ``bench/<name>.py`` ends with ``write_results(name, markdown, verdicts)``:

- ``bench/results/<name>.md``: its tables, for BENCHMARKS.md (``bench/collect.py`` concatenates them);
- ``bench/results/<name>.json``: the machine facts and one row per goal (what, goal, measured, met),
  from which ``bench/collect.py`` writes the summary table of BENCHMARKS.md and the README's figures.

No figure or verdict is typed by hand: a goal counts as met only where a script wrote ``met: true``.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the packages first: a script's own folder (bench/) comes first on sys.path, and bench/encoders.py
# would otherwise stand in for the `encoders` package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]

from ernie_vl import runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

@dataclass
class Verdict:
    """One goal of a benchmark. ``met`` is None for figures that are reported without a goal."""

    what: str
    goal: str
    measured: str
    met: bool | None
    claim: str = "-"  # the brief's claim number this row speaks to, or "-"


@dataclass
class Machine:
    """The machine a result was measured on."""

    cpu: str
    vendor: str
    isa: list[str]
    cores: int
    torch: str = ""
    blas: str = ""
    load_before: float = 0.0
    load_after: float = 0.0
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        """One Markdown line for a results file."""
        load = f"1-min load average {self.load_before:.1f} before, {self.load_after:.1f} after"
        return (f"CPU: {self.cpu} ({self.vendor}, {self.cores} cores; ISA {' '.join(self.isa) or 'baseline'}); "
                f"torch {self.torch}, BLAS {self.blas}; {load}.")


def machine(load_before: float | None = None) -> Machine:
    """Facts of the running machine (CPU model, vendor, ISA flags, torch and its BLAS, load), read by
    :mod:`ernie_vl.runtime` (the same facts the toolkit's kernel choices use)."""
    cpu = runtime.cpu_info()
    torch_version, blas = "", ""
    if "torch" in sys.modules or _importable("torch"):
        import torch

        torch_version = torch.__version__
        blas = "MKL" if torch.backends.mkl.is_available() else "not MKL"
        if torch.backends.mkldnn.is_available():
            blas += " + oneDNN"
    return Machine(cpu=cpu.model, vendor=cpu.vendor or "unknown", isa=list(cpu.isa), cores=os.cpu_count() or 1,
                   torch=torch_version, blas=blas,
                   load_before=os.getloadavg()[0] if load_before is None else load_before,
                   load_after=os.getloadavg()[0])


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def write_results(name: str, markdown: str, verdicts: list[Verdict], machine_facts: Machine,
                  command: str, results_dir: Path | None = None) -> Path:
    """Write ``<name>.md`` and ``<name>.json`` under ``results_dir`` (default bench/results); returns the .md."""
    out = Path(results_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    record = {"benchmark": name, "command": command, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": asdict(machine_facts), "verdicts": [asdict(v) for v in verdicts]}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return md


def verdict_lines(verdicts: list[Verdict]) -> list[str]:
    """One Markdown bullet per verdict: ``- what: goal G, measured M: **met | not met | reported | not measured**``
    (``reported``: a figure with no goal, ``goal="report"``; ``not measured``: a goal the run could not check)."""
    return [f"- {v.what}: goal {v.goal}, measured {v.measured}: **{_outcome(v)}**" for v in verdicts]


def _outcome(v: Verdict) -> str:
    if v.met is not None:
        return "met" if v.met else "not met"
    return "reported" if v.goal == "report" else "not measured"


LOCATION_OPTIONS = ("--work", "--results", "--save-dir")  # where files go, not what is measured: never in a results file


def _placeholder_path(arg: str) -> str:
    """An absolute path (alone or as ``--opt=/path``) becomes ``.../<last part>``: what it names, not where."""
    prefix, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not value.startswith("/"):
        return arg
    return f"{prefix}{sep}.../{Path(value).name}"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command as a user would type it from the repository root, without the options that only name
    folders (LOCATION_OPTIONS: a machine's paths do not belong in a results file)."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg in LOCATION_OPTIONS:
            args[:1] = []  # its value
        elif not arg.startswith(tuple(f"{o}=" for o in LOCATION_OPTIONS)):
            kept.append(_placeholder_path(arg))
    return " ".join([".venv/bin/python", f"bench/{script}"] + [shlex.quote(a) for a in kept])


def rotated_medians(runs: dict, rounds: int, steps: int, clock=time.perf_counter) -> dict:
    """Median milliseconds per call of each ``runs[key]()`` (no arguments): one warm-up call each, then
    ``rounds`` rounds of ``steps`` calls per key, the order rotated every round so no key always runs first.
    ``clock``: seconds (wall time by default); see :func:`rotated_medians_by_clock` for several at once."""
    return rotated_medians_by_clock(runs, rounds, steps, {"ms": clock})["ms"]


def rotated_medians_by_clock(runs: dict, rounds: int, steps: int, clocks: dict) -> dict:
    """``{clock name: {key: median ms per call}}`` of :func:`rotated_medians`, every clock read around the same
    calls. ``time.thread_time`` counts the calling thread's CPU time only: with one intra-op thread that is all of
    the work, without the time the process waits while other processes run on a shared machine."""
    import statistics

    for run in runs.values():  # warm-up: allocator, oneDNN primitives
        run()
    times: dict = {name: {key: [] for key in runs} for name in clocks}
    keys = list(runs)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = {name: clock() for name, clock in clocks.items()}
            for _ in range(steps):
                runs[key]()
            for name, clock in clocks.items():
                times[name][key].append((clock() - t0[name]) / steps)
    return {name: {key: 1000 * statistics.median(v) for key, v in per_key.items()} for name, per_key in times.items()}


def cost_table(ms: dict, baseline: str) -> list[str]:
    """Markdown rows of ``ms[(loop, setting)]`` (milliseconds per step), each with its ratio to ``baseline``'s
    step in the same loop ("-" in a loop without it)."""
    rows = ["| loop | setting | ms / step | x " + baseline + " |", "|---|---|---|---|"]
    return rows + [f"| {kind} | {name} | {v:.1f} | "
                   + (f"{v / ms[kind, baseline]:.2f} |" if (kind, baseline) in ms else "- |") for (kind, name), v in ms.items()]


def publish(name: str, lines: list[str], verdicts: list[Verdict], machine_facts: Machine, command: str) -> str:
    """Append the verdicts to ``lines``, print the text and write it as the results file ``name``."""
    text = "\n".join([*lines, "", *verdict_lines(verdicts)])
    print(text)
    write_results(name, text, verdicts, machine_facts, command)
    return text


def step_cost_parser(doc: str, batch: int):
    """The arguments of a per-step cost bench: ``--threads`` (1), ``--rounds`` (7, at least 5), ``--steps``
    (3 timed steps per round and setting) and ``--batch``; parse with :func:`parse_step_cost_args`."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and setting")
    p.add_argument("--batch", type=int, default=batch)
    return p


def parse_step_cost_args(p):
    """``p.parse_args()``, refusing fewer than 5 rounds (a median of fewer is not worth reporting)."""
    args = p.parse_args()
    if args.rounds < 5:
        p.error(f"--rounds must be >= 5 for a median worth reporting, got {args.rounds}")
    return args
