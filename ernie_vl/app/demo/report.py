"""report.json (every figure) and report.html (one self-contained page a person opens: tables and pictures).

The HTML embeds every PNG as a data URI, so the file can be mailed or opened from anywhere.
The report is a plain dict; this module only renders it and knows nothing about models.

Report layout (all keys optional except ``stages``)::

    {"title": str, "created": str, "out_dir": str, "config": {...}, "environment": {...},
     "stages": [{"name", "title", "status", "seconds", "error"}, ...],
     "headline": {"label": value, ...},               # the few numbers that matter
     "sections": {"Retrieval": {...}, ...},           # nested dicts of figures, shown as tables
     "figures": {"Training curves": "training_curves.png", ...},   # paths relative to out_dir
     "captions": {"Training curves": "what the figure shows", ...},
     "queries": [{"query", "kind", "image", "hits": [{"path", "score", "caption", "correct"}]}],
     "videos": [{"path", "label", "predictions": [[label, score], ...]}],
     "commands": ["ernie-vl search ...", ...]}
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ernie_vl.app.demo.runner import write_json_atomic

PathLike = str | Path

_STATUS_COLOURS = {"done": "#1a9850", "cached": "#4575b4", "failed": "#d73027", "skipped": "#999999"}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:.1em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f5f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{font-weight:600;color:#fff;border-radius:3px;padding:1px 6px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px;background:#fafafa}
.card .v{font-size:24px;font-weight:600} .card .k{color:#555;font-size:13px}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
.hits{display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start;margin:.4em 0 1.2em}
.hit{width:130px;font-size:12px;text-align:center}
.hit img{width:120px;height:120px;object-fit:contain;border:3px solid #999;background:#fff;
image-rendering:pixelated}
.hit.ok img{border-color:#1a9850} .hit.bad img{border-color:#d73027}
.query{width:150px;font-style:italic;background:#f3f3f8;padding:8px;border-radius:6px}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}
details{margin:.3em 0}
"""


def write_report_json(report: Mapping[str, Any], path: PathLike) -> Path:
    """Write the report dict as indented JSON (atomically)."""
    path = Path(path)
    write_json_atomic(path, report)
    return path


def write_report_html(report: Mapping[str, Any], path: PathLike, base_dir: Optional[PathLike] = None,
                      thumb_size: int = 120) -> Path:
    """Render ``report`` into one self-contained HTML file; relative picture paths resolve against ``base_dir``."""
    path = Path(path)
    base = Path(base_dir) if base_dir is not None else path.parent
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(report.get('title', 'ERNIE-VL demo'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(report.get('title', 'ERNIE-VL demo'))}</h1>",
        f"<p class='sub'>{_e(report.get('created', ''))} &middot; output folder <code>"
        f"{_e(report.get('out_dir', str(base)))}</code></p>",
    ]
    if report.get("headline"):
        parts.append(_cards(report["headline"]))
    parts.append("<h2>Stages</h2>" + _stage_table(report.get("stages", [])))
    captions = report.get("captions") or {}
    for title, rel in (report.get("figures") or {}).items():
        parts.append(_figure(title, base / rel if rel else None, captions.get(title, "")))
    for title, body in (report.get("sections") or {}).items():
        parts.append(f"<h2>{_e(title)}</h2>{_value_html(body)}")
    if report.get("queries"):
        parts.append("<h2>Search results</h2>" + _queries(report["queries"], base, thumb_size))
    if report.get("videos"):
        parts.append("<h2>Classified videos</h2>" + _videos(report["videos"]))
    if report.get("commands"):
        cmds = "\n".join(report["commands"])
        parts.append(f"<h2>Use the trained model</h2><pre>{_e(cmds)}</pre>")
    for key, title in (("config", "Configuration"), ("environment", "Environment")):
        if report.get(key):
            parts.append(f"<h2>{title}</h2>{_value_html(report[key])}")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- pieces
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits (fractions as they are), everything else as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _cards(headline: Mapping[str, Any]) -> str:
    cards = "".join(f"<div class='card'><div class='v'>{_e(format_value(v))}</div>"
                    f"<div class='k'>{_e(k)}</div></div>" for k, v in headline.items())
    return f"<div class='cards'>{cards}</div>"


def _stage_table(stages: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for st in stages:
        status = str(st.get("status", "?"))
        colour = _STATUS_COLOURS.get(status, "#666")
        error = st.get("error") or st.get("note") or ""
        detail = _e(error)
        if st.get("traceback"):
            detail += f"<details><summary>traceback</summary><pre>{_e(st['traceback'])}</pre></details>"
        rows.append(
            f"<tr><td>{_e(st.get('title', st.get('name', '')))}</td>"
            f"<td><span class='status' style='background:{colour}'>{_e(status)}</span></td>"
            f"<td class='num'>{float(st.get('seconds', 0.0)):.1f}</td><td>{detail}</td></tr>")
    return ("<table><tr><th>stage</th><th>status</th><th>seconds</th><th>note</th></tr>"
            + "".join(rows) + "</table>")


def _value_html(value: Any, depth: int = 0) -> str:
    """Dicts of scalars -> a two-column table; dicts of dicts -> nested sections; lists of dicts -> a table."""
    if isinstance(value, Mapping):
        if not value:
            return "<p><em>(none)</em></p>"
        scalars = {k: v for k, v in value.items() if not isinstance(v, (Mapping, list, tuple))}
        nested = {k: v for k, v in value.items() if isinstance(v, (Mapping, list, tuple))}
        out = ""
        if scalars:
            out += "<table>" + "".join(
                f"<tr><th>{_e(k)}</th><td class='num'>{_e(format_value(v))}</td></tr>"
                for k, v in scalars.items()) + "</table>"
        for k, v in nested.items():
            tag = "h3" if depth == 0 else "h4"
            out += f"<{tag}>{_e(k)}</{tag}>{_value_html(v, depth + 1)}"
        return out
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            cols: list[str] = []
            for v in value:
                cols += [k for k in v if k not in cols]
            head = "".join(f"<th>{_e(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{_e(_short_repr(v.get(c, '')))}</td>" for c in cols)
                           + "</tr>" for v in value)
            return f"<table><tr>{head}</tr>{body}</table>"
        return f"<p>{_e(_short_repr(value))}</p>"
    return f"<p>{_e(format_value(value))}</p>"


def _short_repr(value: Any, limit: int = 200) -> str:
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(format_value(v) for v in value) + "]"
    else:
        text = format_value(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _figure(title: str, path: Optional[Path], caption: str = "") -> str:
    if path is None or not path.exists():
        return f"<h2>{_e(title)}</h2><p><em>not produced (see the stage table)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    text = f"{_e(caption)} " if caption else ""
    return (f"<h2>{_e(title)}</h2><figure><img alt='{_e(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{text}(<code>{_e(path.name)}</code>)</figcaption></figure>")


def _thumbnail(path: Path, size: int) -> str:
    """A PNG data URI of the picture shrunk to ``size`` pixels, or '' when it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return ""
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _resolve(base: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else base / path


def _queries(queries: Iterable[Mapping[str, Any]], base: Path, size: int) -> str:
    out = []
    for q in queries:
        if q.get("kind") == "image" and q.get("image"):
            src = _thumbnail(_resolve(base, q["image"]), size)
            head = f"<div class='hit'><img src='{src}' alt='query image'><br><b>image query</b></div>"
        else:
            head = f"<div class='query'>&ldquo;{_e(q.get('query', ''))}&rdquo;</div>"
        hits = []
        for h in q.get("hits", []):
            cls = {True: "ok", False: "bad"}.get(h.get("correct"), "")
            src = _thumbnail(_resolve(base, h["path"]), size)
            hits.append(f"<div class='hit {cls}'><img src='{src}' alt='hit'><br>"
                        f"{_e(format_value(h.get('score', '')))}<br>{_e(h.get('caption', ''))}</div>")
        out.append(f"<div class='hits'>{head}{''.join(hits)}</div>")
    return "".join(out)


def _videos(videos: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for v in videos:
        preds = v.get("predictions", [])
        top = preds[0][0] if preds else ""
        ok = v.get("label") is not None and top == v.get("label")
        mark = "&#10003;" if ok else ("&#10007;" if v.get("label") is not None else "")
        pred_text = ", ".join(f"{_e(lbl)} ({float(s):.2f})" for lbl, s in preds)
        rows.append(f"<tr><td>{_e(Path(str(v.get('path', ''))).name)}</td><td>{_e(v.get('label', ''))}</td>"
                    f"<td>{mark}</td><td>{pred_text}</td></tr>")
    return ("<table><tr><th>video</th><th>true class</th><th></th><th>top predictions (score)</th></tr>"
            + "".join(rows) + "</table>")
