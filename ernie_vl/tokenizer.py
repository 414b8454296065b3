"""``ernie_vl.get_tokenizer(model_or_preset)``: the tokenizer at a model's own context length and vocabulary.

open_clip's ``get_tokenizer(model_name)`` habit: a preset name, a checkpoint folder, an ``ErnieVLConfig`` or a
model give the tokenizer that model was built with (``(B, context_length)`` int64 ids, BPE folded into small
vocabularies); no argument gives CLIP's BPE at 77 tokens, and an int that context length.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ernie_vl.config import ErnieVLConfig
from ernie_vl.preprocess import make_tokenizer

TokenizerSource = Union[None, int, str, os.PathLike, ErnieVLConfig, Any]


def _config_of(source: Any) -> Optional[ErnieVLConfig]:
    if isinstance(source, ErnieVLConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        from ernie_vl.presets import list_models, load_config

        if isinstance(source, str) and source in list_models():
            return load_config(source)
        if (Path(source) / "config.json").is_file():
            from ernie_vl.checkpoint import read_config

            return read_config(source)
        raise ValueError(f"unknown model {str(source)!r}: not a preset ({', '.join(list_models())}) "
                         f"nor a checkpoint folder with config.json")
    cfg = getattr(source, "cfg", None)
    return cfg if isinstance(cfg, ErnieVLConfig) else None


def get_tokenizer(model_or_preset: TokenizerSource = None, context_length: Optional[int] = None) -> Callable:
    """The tokenizer for ``model_or_preset`` (see the module docstring): ``tok(["a dog"]) -> (1, L)`` int64.

    ``context_length`` shortens the model's context (never beyond it: the model could not read the rest)."""
    if model_or_preset is None or (isinstance(model_or_preset, int) and not isinstance(model_or_preset, bool)):
        from encoders.text import get_tokenizer as clip_tokenizer

        length = model_or_preset if model_or_preset is not None else (context_length or 77)
        return clip_tokenizer(int(length))
    cfg = _config_of(model_or_preset)
    if cfg is None:
        tok = getattr(model_or_preset, "tokenizer", None)
        if callable(tok) and context_length is None:
            return tok  # any model that carries its tokenizer (an open_clip wrapper, a stand-in)
        raise TypeError(f"get_tokenizer takes a preset name, a checkpoint folder, an ErnieVLConfig, an ErnieVL or "
                        f"a context length, got {type(model_or_preset).__name__}")
    length = cfg.text.context_length
    if context_length is not None:
        if not isinstance(context_length, int) or isinstance(context_length, bool) or not 1 <= context_length <= length:
            raise ValueError(f"context_length must be an int in [1, {length}] (the model's context), "
                             f"got {context_length!r}")
        length = context_length
    return make_tokenizer(cfg.text.vocab_size, length)
