"""The plain-text summary printed at the end of the demo (stages, headline figures, where things are)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ernie_vl.app.demo.report import format_value


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """A boxed monospace table; every cell through ``format_value``; numbers right-aligned."""
    cells = [[format_value(c) for c in row] for row in rows]
    head = [str(h) for h in header] if header else None
    width = max((len(r) for r in cells), default=0)
    if head:
        width = max(width, len(head))
    cells = [r + [""] * (width - len(r)) for r in cells]
    if head:
        head = head + [""] * (width - len(head))
    widths = [max([len(r[i]) for r in cells] + ([len(head[i])] if head else [0])) for i in range(width)]
    numeric = [all(_looks_numeric(r[i]) for r in cells if r[i]) and any(r[i] for r in cells)
               for i in range(width)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule]
    if head:
        out += [line(head), rule.replace("-", "=")]
    out += [line(r) for r in cells]
    out.append(rule)
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False


def format_summary(report: Mapping[str, Any]) -> str:
    """Stages (status, seconds, note), then the headline figures, then the files written."""
    blocks = []
    stage_rows = []
    for st in report.get("stages", []):
        note = st.get("error") or st.get("note") or ""
        if len(note) > 70:
            note = note[:67] + "..."
        stage_rows.append([st.get("title", st.get("name", "")), st.get("status", "?"),
                           round(float(st.get("seconds", 0.0)), 1), note])
    if stage_rows:
        blocks.append(format_table(stage_rows, header=["stage", "status", "seconds", "note"]))
    headline = report.get("headline") or {}
    if headline:
        blocks.append(format_table([[k, v] for k, v in headline.items()], header=["result", "value"]))
    files = report.get("files") or {}
    if files:
        blocks.append(format_table([[k, v] for k, v in files.items()], header=["output", "path"]))
    failed = [st for st in report.get("stages", []) if st.get("status") == "failed"]
    if failed:
        blocks.append(f"{len(failed)} stage(s) failed; details in report.html / report.json.")
    return "\n\n".join(blocks)
