"""File names that are not valid UTF-8 (Latin-1 bytes from old disks and zip files), kept exactly.

Python reads such a name as a ``str`` with lone surrogates (``surrogateescape``: byte 0xE9 becomes
U+DCE9), which opens the file again but cannot be encoded as UTF-8. Metadata keeps that ``str``:
:func:`json_text` writes it as JSON ``\\udce9`` escapes only when needed (readable UTF-8 otherwise),
and ``json.loads`` gives back the same ``str``, so a rerun matches the file. :func:`printable` is
for people: undecodable bytes shown as ``\\xe9``.
"""
from __future__ import annotations

import json
from typing import Any


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` as readable UTF-8, or with ASCII escapes when a string holds lone surrogates."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def printable(text: Any) -> str:
    """``str(text)`` safe to print or write as UTF-8: bytes of a non-UTF-8 name shown as ``\\xNN``."""
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name byte made
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
