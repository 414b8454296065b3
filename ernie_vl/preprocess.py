"""Preprocessing of a model: the image transform (PIL -> (3, H, W) float32) and its tokenizer.

Resize the shorter side to ``image_size`` (bicubic), centre-crop a square, scale to
[0, 1], normalise with ``mean`` / ``std`` (CLIP's by default) — open_clip's eval transform.
It is a plain picklable object, so DataLoader workers can use it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """Callable ``PIL.Image -> (3, image_size, image_size) float32``.

    Attributes: ``image_size`` (int), ``mean`` and ``std`` (3-tuples of floats).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {list(std)}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"

    def resize_crop(self, image: Image.Image, fast: bool = False) -> Image.Image:
        """RGB ``image`` -> (image_size, image_size) RGB PIL image: shorter side resized (bicubic), centre crop.

        ``fast`` lets PIL box-reduce an image more than 3x larger than the target before the bicubic
        pass (``reducing_gap``): much faster on big photos, within a few grey levels of the exact path.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        if w < 1 or h < 1:
            raise ValueError(f"image has no pixels: size {image.size}")
        scale = self.image_size / min(w, h)
        new_w, new_h = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0 if fast else None)
        left, top = (new_w - self.image_size) // 2, (new_h - self.image_size) // 2
        return image.crop((left, top, left + self.image_size, top + self.image_size))

    def to_uint8(self, image: Image.Image, fast: bool = True) -> np.ndarray:
        """``image`` -> uint8 (3, image_size, image_size): the pixels before scaling and normalisation.

        ``__call__(image)`` equals these pixels / 255, normalised (with ``fast=False``). Decoded training
        caches store this form: 4x smaller than float32, and no float round trip per image. The result is
        a read-only view of PIL's pixels (no copy); ``np.ascontiguousarray`` it to own them.
        """
        return np.asarray(self.resize_crop(image, fast), dtype=np.uint8).transpose(2, 0, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(self.resize_crop(image), dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((pixels - mean) / std).contiguous()


class FoldedTokenizer:
    """CLIP BPE tokenizer whose ids are folded into a smaller vocabulary (small test models).

    Ordinary BPE ids map to ``id % (vocab_size - 2)``; start / end of text map to
    ``vocab_size - 2`` / ``vocab_size - 1``; padding stays 0. The end-of-text token thus
    keeps the largest id in every row, so CLIP's argmax pooling still finds it. Distinct
    words may share an id (a hash); this is for unit tests and toy models only.
    Callable ``str | list[str] -> (B, context_length) int64``, like ``ClipTokenizer``.
    """

    def __init__(self, base, vocab_size: int) -> None:
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
        self.base = base
        self.vocab_size = vocab_size
        self.context_length = base.context_length
        self.pad_token_id = 0
        self.sot_token_id = vocab_size - 2
        self.eot_token_id = vocab_size - 1

    def __repr__(self) -> str:
        return f"FoldedTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        ids = self.base(texts)
        folded = ids % (self.vocab_size - 2)
        folded = torch.where(ids == self.base.sot_token_id, self.sot_token_id, folded)
        folded = torch.where(ids == self.base.eot_token_id, self.eot_token_id, folded)
        return torch.where(ids == 0, 0, folded).to(torch.int64)


def make_tokenizer(vocab_size: int, context_length: int):
    """The model's tokenizer: open_clip BPE, folded when ``vocab_size`` is below BPE's 49408."""
    from encoders.text import get_tokenizer

    base = get_tokenizer(context_length)
    if vocab_size >= base.vocab_size:
        return base
    return FoldedTokenizer(base, vocab_size)
