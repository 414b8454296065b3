"""Text side: CLIP's BPE tokenizer (our implementation in ``encoders.bpe``, on
the vocabulary file that ships inside open_clip; no download, no open_clip
import) and a token + learned positional embedding."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .bpe import ClipBPE


@lru_cache(maxsize=1)
def _clip_bpe() -> ClipBPE:
    return ClipBPE()


class ClipTokenizer:
    """Callable ``str | list[str] -> (B, context_length) int64`` (CLIP BPE).

    Each row is ``<start_of_text> tokens <end_of_text>`` zero-padded; texts longer
    than the context are truncated with ``<end_of_text>`` kept last.
    Attributes: ``vocab_size`` (49408), ``context_length``, ``sot_token_id``,
    ``eot_token_id``, ``pad_token_id`` (0).
    """

    pad_token_id = 0

    def __init__(self, context_length: int = 77) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
        self._tok = _clip_bpe()
        self.context_length = context_length
        self.vocab_size: int = self._tok.vocab_size
        self.sot_token_id: int = self._tok.sot_token_id
        self.eot_token_id: int = self._tok.eot_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self._tok.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens."""
        return self._tok.encode(text)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of ids; start/end/padding tokens are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.sot_token_id, self.eot_token_id, self.pad_token_id}
        return self._tok.decode([i for i in ids if i not in specials]).strip()


def get_tokenizer(context_length: int = 77) -> ClipTokenizer:
    """The CLIP BPE tokenizer: ``tok(["a dog"]) -> (1, context_length)`` int64."""
    return ClipTokenizer(context_length)


class TextEmbedding(nn.Module):
    """Token embedding plus a learned positional embedding.

    ``forward(tokens (B, L) int64, L <= context_length) -> (B, L, width)``.
    Init as open_clip: token std 0.02, position std 0.01.
    """

    def __init__(self, vocab_size: int = 49408, width: int = 512, context_length: int = 77) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("width", width), ("context_length", context_length)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"expected a (B, L) int64 tensor, got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens of shape (B, L), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"expected integer token ids (int64), got dtype {tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds context_length {self.context_length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
