"""Argument checks shared by the configs: a bad value raises ``ValueError`` naming it and what is valid."""
from __future__ import annotations

from typing import Iterable


def check_choice(name: str, value: object, valid: Iterable[str]) -> None:
    """ValueError ``unknown {name} {value!r}; valid: ...`` unless ``value`` is one of ``valid``."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
