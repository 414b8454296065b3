"""bench/_report.py and bench/collect.py: verdicts come from results files, never from hand-typed text."""
from __future__ import annotations

import json
import sys

import pytest

from tests._bench_helpers import BENCH, load_bench as _load


@pytest.fixture()
def report():
    return _load("_report")


@pytest.fixture()
def collect():
    return _load("collect")


def test_machine_names_the_cpu_and_isa(report):
    facts = report.machine(load_before=0.5)
    assert facts.cpu and facts.cores >= 1
    from ernie_vl import runtime

    assert set(facts.isa) <= set(runtime.ISA_FLAGS)
    line = facts.line()
    assert facts.cpu in line and "load average 0.5 before" in line


def test_write_results_then_summary_and_readme_block(tmp_path, monkeypatch, report, collect):
    facts = report.Machine(cpu="Test CPU 9000", vendor="TestVendor", isa=["avx2"], cores=2, torch="x", blas="y")
    verdicts = [report.Verdict("ours / anchor", ">= 1.0", "1.23x", True, claim="7"),
                report.Verdict("ours / other", ">= 2.5", "2.10x", False),
                report.Verdict("size", "report", "0.25", None)]
    md = report.write_results("fake", "# Fake\n\ntable", verdicts, facts, "python bench/fake.py", results_dir=tmp_path)
    assert md.read_text().startswith("# Fake")
    record = json.loads((tmp_path / "fake.json").read_text())
    assert record["machine"]["cpu"] == "Test CPU 9000"
    assert [v["met"] for v in record["verdicts"]] == [True, False, None]

    table = collect.summary_table([record], without_verdicts=["old"])
    lines = [row for row in table.splitlines() if row.startswith("|")]
    assert len(lines) == 2 + 3  # header, rule, three verdicts
    assert "| 7 | ours / anchor | >= 1.0 | 1.23x | met |" in table
    assert "| **missed** |" in table and "| reported |" in table
    assert "Test CPU 9000" in table and "`old`" in table

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:summary:begin -->\nhand-typed 9.9x\n<!-- bench:summary:end -->\n"
                      "middle\n<!-- bench:fake:begin -->\nold figures\n<!-- bench:fake:end -->\n"
                      "<!-- bench:absent:begin -->\nkept\n<!-- bench:absent:end -->\noutro\n")
    monkeypatch.setattr(collect, "RESULTS", tmp_path)
    assert collect.update_readme(table, readme) == ["summary", "fake"]
    text = readme.read_text()
    assert "hand-typed" not in text and "1.23x" in text
    assert "old figures" not in text and "table" in text and "# Fake" not in text
    assert "kept" in text  # a block whose results file does not exist is left alone
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("outro\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert collect.update_readme(table, plain) == []
    assert plain.read_text() == "no markers\n"


def test_every_benchmark_script_starts():
    """Each bench/*.py imports and parses its arguments (``--help``) from a plain interpreter: catches a
    benchmark broken by a move elsewhere (e.g. bench/encoders.py standing in for the `encoders` package)."""
    import os
    import subprocess

    scripts = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "collect.py")
    assert len(scripts) >= 10
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=BENCH.parent, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for p in scripts}
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        if proc.returncode != 0:
            failed[name] = err.strip().splitlines()[-1:] if err.strip() else proc.returncode
    assert not failed, failed


def test_verdict_lines_say_met_not_met_or_not_measured(report):
    lines = report.verdict_lines([report.Verdict("a", ">= 3x", "3.20x", True), report.Verdict("b", ">= 3x", "1.10x", False),
                                  report.Verdict("c", "-", "0.5", None), report.Verdict("d", "report", "1.1x", None)])
    assert lines == ["- a: goal >= 3x, measured 3.20x: **met**", "- b: goal >= 3x, measured 1.10x: **not met**",
                     "- c: goal -, measured 0.5: **not measured**", "- d: goal report, measured 1.1x: **reported**"]


def _server_rounds(rate_on: float, rate_off: float) -> dict:
    one = lambda rate: {"rate": rate, "latencies": [0.1, 0.2], "mean_batch": 1.0, "batch_ms": 5.0,  # noqa: E731
                        "busy": 0.9, "requests": 10, "errors": 0}
    return {(c, m): [one(rate_on if m == "on" else rate_off)] * 2 for c in (1, 32) for m in ("on", "off")}


def test_server_verdict_is_the_on_off_ratio_at_32_clients():
    server = _load("server")
    text, ratios = server.model_section("preset:tiny", {"results": _server_rounds(90.0, 30.0),
                                                        "headroom": {1: 10.0, 32: 2.0}, "seconds": 1.0}, [1, 32])
    assert ratios == {1: 3.0, 32: 3.0} and "| 32 | **3.00x** |" in text
    v = server.verdict_of("preset:tiny", ratios)
    assert (v.met, v.measured, v.claim) == (True, "3.00x", "12")
    _, low = server.model_section("preset:base", {"results": _server_rounds(50.0, 20.0),
                                                  "headroom": {1: 10.0, 32: 2.0}, "seconds": 1.0}, [1, 32])
    assert server.verdict_of("preset:base", low).met is False  # 2.5x
    assert server.verdict_of("preset:base", {1: 1.0}).met is None  # 32 clients not run: not measured


def test_priority_verdict_from_steps_to_the_uniform_target():
    ps = _load("priority_sampling")
    curve = lambda *losses: [(10 * i, loss) for i, loss in enumerate(losses)]  # noqa: E731
    curves = {"priority": {0: curve(3, 1.5, 1.0, 0.9), 1: curve(3, 2, 1.2, 1.0)},
              "uniform": {0: curve(3, 2, 1.5, 1.0), 1: curve(3, 2.5, 2, 1.0)}}
    assert ps.steps_to(curves["priority"][0], 1.0) == 20 and ps.steps_to(curves["uniform"][1], 0.5) is None
    pairs, ratios = ps.ratio_of(curves, "priority", 1.0, 2)
    assert pairs == [(20, 30), (30, 30)] and ratios == pytest.approx([2 / 3, 1.0])
    v = ps.verdict_of("priority", pairs, ratios)
    assert v.met is False and v.measured.startswith("0.83 (median of 2 seeds")  # 25% faster needs <= 0.75
    never = ps.verdict_of("priority", [(None, 30), (None, None)], [])
    assert never.met is False and "reached the target in 0 of 2 seeds, uniform in 1" in never.measured
    fast = ps.verdict_of("priority", [(20, 30)], [2 / 3])
    assert fast.met is True and fast.claim == "6"


def test_train_screens_rows_accumulate_and_a_rerun_replaces_its_row():
    ts = _load("train_screens")
    row = lambda name, seed, value, steps=300: {"name": name, "task": "pairs", "seed": seed, "steps": steps,  # noqa: E731
                                                "text_to_image_R@1": value}
    old = [row("pairs uniform lr 1e-3", 0, 0.5), row("pairs priority lr 2e-3", 0, 0.4)]
    merged = ts.merge_rows(old, [row("pairs uniform lr 1e-3", 0, 0.6), row("pairs uniform lr 1e-3", 1, 0.55)])
    assert [(r["name"], r["seed"], r["text_to_image_R@1"]) for r in merged] == [
        ("pairs priority lr 2e-3", 0, 0.4), ("pairs uniform lr 1e-3", 0, 0.6), ("pairs uniform lr 1e-3", 1, 0.55)]
    best = ts.best_rows(merged + [row("pairs uniform lr 5e-4", 0, 0.9, steps=20)])
    assert [(v.met, v.measured) for v in best] == [(None, "0.900 (`pairs uniform lr 5e-4`, seed 0)"),
                                                  (None, "0.600 (`pairs uniform lr 1e-3`, seed 0)")]


def test_command_line_leaves_out_folder_options(report):
    argv = ["--steps", "300", "--work", "/somewhere/w", "--only", "a b", "--results=/elsewhere", "--seeds", "0"]
    assert report.command_line("x.py", argv) == ".venv/bin/python bench/x.py --steps 300 --only 'a b' --seeds 0"


def test_train_screens_report_names_the_variants_not_run(report):
    ts = _load("train_screens")
    rows = [{"name": "pairs uniform lr 1e-3", "task": "pairs", "seed": 0, "steps": 300, "threads": 1, "seconds": 5.0,
             "load_before": 1.0, "load_after": 1.0, "written": "today", "cpu": "cpu", "text_to_image_R@1": 0.5,
             "image_to_text_R@1": 0.4, "text_to_image_R@5": 0.9}]
    text = ts.report(rows, report.machine(0.0))
    assert "| pairs uniform lr 1e-3 | 0 | 300 | 1 | 0.500 | 0.400 | 0.900 |  |  |  | 5 | 1.0 / 1.0 | today |" in text
    missing = text.split("Not run in this set yet: ")[1].split("\n")[0]
    assert "`pairs uniform lr 1e-3`" not in missing and all(f"`{n}`" in missing for n in ts.VARIANTS if n != "pairs uniform lr 1e-3")


def test_train_screens_report_only_rewrites_the_results_from_stored_rows(tmp_path, monkeypatch):
    ts = _load("train_screens")
    row = {"name": "videos uniform lr 1e-3", "task": "videos", "seed": 0, "steps": 300, "threads": 1, "seconds": 9.0,
           "load_before": 2.0, "load_after": 3.0, "written": "today", "cpu": "cpu", "video_top1": 0.75,
           "video_zeroshot_top1": 0.5, "video_top5": 1.0}
    monkeypatch.setattr(sys, "argv", ["train_screens.py", "--report-only", "--results", str(tmp_path)])
    with pytest.raises(SystemExit):  # nothing stored yet
        ts.main()
    (tmp_path / "train_screens_rows.json").write_text(json.dumps([row]))
    ts.main()
    record = json.loads((tmp_path / "train_screens.json").read_text())
    assert record["command"] == ".venv/bin/python bench/train_screens.py --report-only"
    assert [(v["met"], v["measured"]) for v in record["verdicts"]] == [(None, "0.750 (`videos uniform lr 1e-3`, seed 0)")]
    assert "| videos uniform lr 1e-3 | 0 | 300 | 1 |  |  |  | 0.750 | 0.500 | 1.000 | 9 |" in \
        (tmp_path / "train_screens.md").read_text()


def test_command_line_hides_the_folders_of_absolute_paths(report):
    argv = ["--checkpoint", "/home/someone/ckpt/divided", "--model=/data/models/m1", "--steps", "3", "rel/path"]
    assert report.command_line("x.py", argv) == (
        ".venv/bin/python bench/x.py --checkpoint .../divided --model=.../m1 --steps 3 rel/path")
