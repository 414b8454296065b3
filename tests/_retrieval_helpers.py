"""Test helpers for the retrieval / server tests: image files and small stand-in models."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def write_color_image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    """A solid-colour RGB image (PNG unless the suffix says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


class ToTensor8:
    """PIL RGB -> (3, 8, 8) float in [0, 1] (nearest resize); has image_size like a real preprocess."""

    image_size = 8

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB").resize((8, 8), Image.NEAREST), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CharTokenizer:
    """Strings -> (B, 16) int64 of byte values (0 = pad)."""

    context_length = 16

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.int64)
        for i, t in enumerate(texts):
            b = t.encode("utf-8")[: self.context_length]
            out[i, : len(b)] = torch.tensor(list(b), dtype=torch.int64)
        return out


COLOR_WORDS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColorModel(torch.nn.Module):
    """A stand-in model whose embeddings are the mean colour (images) or colour words (texts).

    encode_image (B,3,H,W) -> (B,3) L2-normalised mean RGB; encode_text (B,L) -> (B,3):
    the sum of the colour words' RGB found in the decoded bytes. Counts calls and batch sizes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.preprocess = ToTensor8()
        self.tokenizer = CharTokenizer()
        self.model_id = "test:color"
        self.image_batch_sizes: list[int] = []
        self.text_batch_sizes: list[int] = []
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.image_batch_sizes.append(images.shape[0])
        return F.normalize(images.float().mean(dim=(2, 3)) + 1e-6, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.text_batch_sizes.append(tokens.shape[0])
        feats = []
        for row in tokens.tolist():
            text = bytes(c for c in row if c).decode("utf-8", "ignore")
            v = torch.full((3,), 1e-3)
            for word, rgb in COLOR_WORDS.items():
                if word in text:
                    v = v + torch.tensor(rgb)
            feats.append(v)
        return F.normalize(torch.stack(feats), dim=-1)


def write_captions_csv(path: Path, rows: list[tuple[str, str]], header=("filepath", "caption")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path
