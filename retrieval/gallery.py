"""Show search hits: a self-contained HTML page or a PNG contact sheet of thumbnails with scores."""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from retrieval.images import ImageLoadError, PathLike, load_image
from retrieval.names import printable
from retrieval.search import SearchHit

GALLERY_FORMATS = (".html", ".htm", ".png")
OUTSIDE_NOTE = "not shown: outside the indexed folder (--allow-outside to show it)"


def hit_file(hit: SearchHit, root: Optional[PathLike], allow_outside: bool = False) -> tuple[Optional[Path], bool]:
    """(the file a hit's ``metadata["path"]`` names, whether it was refused for lying outside ``root``).

    Index metadata may come from elsewhere: unless ``allow_outside``, only files whose real path
    (symbolic links followed) is under ``root`` (the current folder when None) are read.
    """
    rel = hit.metadata.get("path") if hit.metadata else None
    if not isinstance(rel, str):
        return None, False
    base = Path(root if root is not None else ".").resolve()
    path = base / rel  # an absolute rel replaces base
    if allow_outside:
        return path, False
    try:
        path.resolve().relative_to(base)
    except (ValueError, OSError):
        return None, True
    return path, False


def _thumbnail(path: Optional[Path], size: int) -> Image.Image:
    """A ``size`` x ``size`` thumbnail (grey placeholder when the file is missing or unreadable)."""
    canvas = Image.new("RGB", (size, size), (235, 235, 235))
    if path is None:
        return canvas
    try:
        img = load_image(path)
    except ImageLoadError:
        return canvas
    img.thumbnail((size, size))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def _label(hit: SearchHit) -> str:
    name = hit.metadata.get("path") or hit.metadata.get("caption") or f"id {hit.id}"
    return f"#{hit.rank + 1}  {hit.score:.3f}  {name}"


def write_html(hits: Sequence[SearchHit], out: Path, root: Optional[PathLike], title: str, thumb: int,
               allow_outside: bool = False) -> None:
    cards = []
    for hit in hits:
        path, refused = hit_file(hit, root, allow_outside)
        buf = io.BytesIO()
        _thumbnail(path, thumb).save(buf, format="JPEG", quality=85)
        src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        caption = hit.metadata.get("caption")
        extra = f"<div class='cap'>{html.escape(printable(caption))}</div>" if caption else ""
        extra += f"<div class='cap'>{OUTSIDE_NOTE}</div>" if refused else ""
        cards.append(
            f"<figure><img src='{src}' width='{thumb}' height='{thumb}' alt='{html.escape(str(hit.id))}'>"
            f"<figcaption><b>#{hit.rank + 1}</b> score {hit.score:.4f}<br>"
            f"{html.escape(printable(hit.metadata.get('path', f'id {hit.id}')))}{extra}</figcaption></figure>")
    title = printable(title)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}}"
        "figure{display:inline-block;margin:6px;vertical-align:top;width:" + str(thumb) + "px}"
        "figcaption{font-size:12px;word-break:break-all}.cap{color:#555}</style></head><body>"
        f"<h2>{html.escape(title)}</h2>" + "".join(cards) + "</body></html>")
    out.write_text(page, encoding="utf-8")


def write_contact_sheet(hits: Sequence[SearchHit], out: Path, root: Optional[PathLike], title: str,
                        thumb: int, columns: int = 5, allow_outside: bool = False) -> None:
    columns = max(1, min(columns, len(hits) or 1))
    rows = max(1, math.ceil(len(hits) / columns))
    label_h, header_h = 16, 24
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, header_h + rows * (thumb + label_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), printable(title)[:120], fill="black")
    for n, hit in enumerate(hits):
        x = 8 + (n % columns) * (thumb + 8)
        y = header_h + (n // columns) * (thumb + label_h + 8)
        sheet.paste(_thumbnail(hit_file(hit, root, allow_outside)[0], thumb), (x, y))
        draw.text((x, y + thumb + 2), printable(_label(hit))[: thumb // 6], fill="black")
    sheet.save(out, format="PNG")


def write_gallery(hits: Sequence[SearchHit], out: PathLike, root: Optional[PathLike] = None,
                  title: str = "search results", thumb: int = 160, allow_outside: bool = False) -> Path:
    """Write ``hits`` as HTML (``.html``) or a PNG contact sheet (``.png``); returns the path.

    Image paths come from ``hit.metadata["path"]`` relative to ``root``; a path that leads outside
    ``root`` (absolute, ``..`` or a symbolic link) is shown as a grey placeholder, not read, unless
    ``allow_outside``.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in GALLERY_FORMATS:
        raise ValueError(f"gallery file {str(out)!r} must end in one of {GALLERY_FORMATS}")
    if thumb < 16:
        raise ValueError(f"thumb must be >= 16 pixels, got {thumb}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        write_contact_sheet(hits, out, root, title, thumb, allow_outside=allow_outside)
    else:
        write_html(hits, out, root, title, thumb, allow_outside=allow_outside)
    return out
