"""Trimming a batch of text tokens to its longest real sequence, and a check that it is exact.

Tokenizers pad every text to the model's full context (77 for CLIP); a batch of short queries is
mostly padding. For a causal text encoder pooled at the end-of-text token (CLIP, ErnieVL) -- or any
encoder that masks padding -- cutting the trailing all-padding columns leaves every embedding
unchanged and saves most of the forward. Whether a given model allows it is *tested*, not assumed:
:func:`trimming_is_exact` encodes probe texts both ways and compares.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

PROBE_TEXTS = ("a photo of a dog on a beach", "x", "two red cars")  # short: fit any context >= 10


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's padding id (``pad_token_id`` when it has one, else 0 as in CLIP)."""
    pad = getattr(tokenizer, "pad_token_id", 0)
    return int(pad) if isinstance(pad, int) else 0


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """(B, L) ids -> (B, L') with L' = 1 + the last column holding a non-padding id in any row."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise TypeError(f"expected a (B, L) token tensor, got {type(tokens).__name__}")
    real = (tokens != pad_id).any(dim=0).nonzero()
    length = int(real[-1]) + 1 if len(real) else 1
    return tokens if length == tokens.shape[1] else tokens[:, :length].contiguous()


def trimming_is_exact(encode: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                      texts: Sequence[str] = PROBE_TEXTS, atol: float = 1e-5) -> bool:
    """True when ``encode(trim_padding(tok))`` matches ``encode(tok)`` on ``texts`` (B, D) within ``atol``.

    False when the tokenizer does not give a (B, L) tensor, nothing can be trimmed, or the model
    refuses or changes the trimmed batch (e.g. a positional table that must match the full context).
    """
    try:
        tokens = tokenizer(list(texts))
    except Exception:
        return False
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        return False
    trimmed = trim_padding(tokens, pad_id_of(tokenizer))
    if trimmed.shape[1] == tokens.shape[1]:
        return False
    try:
        full, short = encode(tokens), encode(trimmed)
    except Exception:
        return False
    return bool(full.shape == short.shape and torch.allclose(full.float(), short.float(), rtol=0, atol=atol))
