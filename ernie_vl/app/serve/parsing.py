"""Strict request parsing: every malformed body or field becomes an :class:`HTTPError` (a 4xx with a
short message), never an exception that reaches the client as a 500.

JSON is parsed as RFC 8259 JSON, not Python's superset: ``NaN`` / ``Infinity`` and numbers that
overflow a float are refused; nesting beyond the interpreter's recursion limit (about 1000 levels;
the C parser checks it as it descends, so a 100,000-deep body fails fast) is a 400; strings holding
lone UTF-16 surrogates (``"\\ud800"``, which no UTF-8 encoder accepts) are refused where a field is
read.
"""
from __future__ import annotations

import json
import math
from typing import Any

_REPR_CHARS = 60


class HTTPError(Exception):
    """A refusal: ``status`` (4xx/5xx) and a short ``message`` for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def short_repr(value: Any, limit: int = _REPR_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (ASCII-safe: surrogates come out escaped)."""
    text = ascii(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} does not fit a 64-bit float")
    return value


def parse_json_object(body: bytes) -> dict:
    """Bytes of a request body -> the JSON object it holds, or HTTPError 400 / 422 saying why not."""
    if not body.strip():
        raise HTTPError(400, "the request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HTTPError(400, f"the request body is not UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise HTTPError(400, f"the request body is not valid JSON ({err.msg} at character {err.pos})") from None
    except RecursionError:                        # the C parser stops at the interpreter's depth limit
        raise HTTPError(400, "the JSON body is nested too deeply") from None
    except ValueError as err:                     # NaN / Infinity / overflow / huge integers
        reason = str(err) if "JSON" in str(err) or "float" in str(err) else "a number is out of range"
        raise HTTPError(400, f"the request body is not valid JSON: {reason}") from None
    if not isinstance(value, dict):
        raise HTTPError(422, f"the JSON body must be an object, got {type(value).__name__}")
    return value


def check_string(value: Any, name: str, max_chars: int) -> str:
    """A non-empty, UTF-8-encodable string of at most ``max_chars`` characters, else HTTPError."""
    if not isinstance(value, str) or not value.strip():
        raise HTTPError(422, f"{name} must be a non-empty string, got {short_repr(value)}")
    if len(value) > max_chars:
        raise HTTPError(413, f"a {name} of {len(value)} characters; the limit is {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HTTPError(422, f"{name} holds a lone surrogate (U+{ord(value[err.start]):04X}) "
                             f"at character {err.start}; send valid Unicode") from None
    return value


def int_field(value: Any, name: str, default: int, hi: int) -> int:
    """An integer in [1, hi] from a JSON number or a form string; ``default`` when absent."""
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HTTPError(422, f"{name} must be an integer in [1, {hi}], got {short_repr(value)}")
    try:
        k = int(value) if not isinstance(value, str) else int(value.strip())
    except (ValueError, OverflowError):
        raise HTTPError(422, f"{name} must be an integer in [1, {hi}], got {short_repr(value)}") from None
    if not 1 <= k <= hi or (isinstance(value, float) and value != k):
        raise HTTPError(422, f"{name} must be an integer in [1, {hi}], got {short_repr(value)}")
    return k
