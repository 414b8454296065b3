"""bench/_report.py and bench/collect.py: verdicts come from results files, never from hand-typed text."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    sys.path.append(str(BENCH))  # after the packages: bench/encoders.py must not shadow `encoders`
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


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
