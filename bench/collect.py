"""Gather the latest figures of every benchmark into BENCHMARKS.md and the README.

Each ``bench/<name>.py`` writes ``bench/results/<name>.md`` (its tables) and, through
``bench/_report.py``, ``bench/results/<name>.json`` (the machine and one verdict row per goal).
This script writes:

- BENCHMARKS.md: a summary table built from the JSON verdicts, then every section;
- the README's marked blocks: ``<!-- bench:summary:begin -->`` ... ``<!-- bench:summary:end -->``
  gets the same summary table, ``<!-- bench:NAME:begin -->`` ... ``<!-- bench:NAME:end -->`` the
  body of ``bench/results/NAME.md`` (its title line dropped).

Nothing in either is typed by hand; a section without a JSON file is listed as having no
script-written verdict.

    python bench/collect.py
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ORDER = ("encoders", "moe", "quantize", "int8_accuracy", "int8_fusion", "video", "retrieval", "hnsw_at_scale", "hnsw_mmap", "server",
         "server_abuse",
         "data", "train_synthetic", "train_digits", "digits_validation", "few_shot_video", "video_stem_cost", "video_init_cost", "image_stem_cost", "moe_balance", "priority_sampling",
         "train_screens")
BLOCK = re.compile(r"<!-- bench:(\w+):begin -->\n.*?<!-- bench:\1:end -->", re.S)

HEADER = """# Benchmarks

Latest figures, each with the command that produced it. Every benchmark times ours and its
anchor in the same process (interleaved rounds, medians), prints the ratio, computes its verdict
against the goal and names the CPU it ran on. Regenerate one section with its command, then
`python bench/collect.py`.
"""


def _status(met) -> str:
    return {True: "met", False: "**missed**", None: "reported"}[met]


def summary_table(records: list[dict], without_verdicts: list[str]) -> str:
    """Markdown table: one row per verdict, with the CPU and the date each was measured."""
    rows = ["| # | what | goal | measured | status | benchmark, CPU, date |", "|---|---|---|---|---|---|"]
    for rec in records:
        cpu = rec["machine"]["cpu"]
        where = f"`{rec['benchmark']}`, {cpu}, {rec['written']}"
        for v in rec["verdicts"]:
            rows.append(f"| {v['claim']} | {v['what']} | {v['goal']} | {v['measured']} | {_status(v['met'])} | {where} |")
    text = "\n".join(rows) + "\n"
    if without_verdicts:
        text += ("\nNo script-written verdict yet (figures in their sections come from earlier runs that did not "
                 "record the CPU or compute a verdict; rerun them): "
                 + ", ".join(f"`{n}`" for n in without_verdicts) + ".\n")
    return text


def load_records() -> tuple[list[dict], list[str], list[str]]:
    """(verdict records in ORDER, names with a .md but no .json, every section name in ORDER)."""
    mds = {p.stem: p for p in RESULTS.glob("*.md")}
    names = [n for n in ORDER if n in mds] + sorted(set(mds) - set(ORDER))
    records, missing = [], []
    for name in names:
        js = RESULTS / f"{name}.json"
        if js.exists():
            records.append(json.loads(js.read_text()))
        else:
            missing.append(name)
    return records, missing, names


def section_body(name: str) -> str:
    """``bench/results/NAME.md`` without its title line."""
    lines = (RESULTS / f"{name}.md").read_text().strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines).strip() + "\n"


def update_readme(table: str, readme: Path = ROOT / "README.md") -> list[str]:
    """Fill the README's marked blocks (see the module docstring); returns the names filled."""
    text = readme.read_text()
    filled: list[str] = []

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name == "summary":
            body = table
        elif (RESULTS / f"{name}.md").exists():
            body = section_body(name)
        else:
            return match.group(0)  # no results yet: leave the block as it is
        filled.append(name)
        return f"<!-- bench:{name}:begin -->\n{body}<!-- bench:{name}:end -->"

    new = BLOCK.sub(fill, text)
    if new != text:
        readme.write_text(new)
    return filled


def main() -> None:
    records, missing, names = load_records()
    table = summary_table(records, missing)
    parts = [HEADER, "## Summary: goals against what we measured\n\n" + table]
    for name in names:
        parts.append((RESULTS / f"{name}.md").read_text().strip() + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    filled = update_readme(table)
    print(f"BENCHMARKS.md: {len(names)} sections, {sum(len(r['verdicts']) for r in records)} verdicts"
          f"{'; README blocks filled: ' + ', '.join(filled) if filled else ''}")


if __name__ == "__main__":
    main()
