"""Small stand-in models for the video pipeline tests (no ernie_vl import)."""
from __future__ import annotations

import torch
from torch import nn

COLOURS = ("red", "green", "blue")


class BlueLevelClassifier(nn.Module):
    """``classify_video``: logits peak at the class whose centre is nearest the clip's mean blue value.

    ``centres`` are in the clip's (normalised) units; ``num_views_seen`` counts the clips it was given.
    """

    def __init__(self, centres: list[float], sharpness: float = 50.0) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.tensor(centres, dtype=torch.float32), requires_grad=False)
        self.sharpness = sharpness
        self.clips_seen = 0

    def classify_video(self, clips: torch.Tensor) -> torch.Tensor:
        assert clips.dim() == 5 and clips.shape[2] == 3
        self.clips_seen += clips.shape[0]
        blue = clips[:, :, 2].mean(dim=(1, 2, 3))  # (B,)
        return -self.sharpness * (blue[:, None] - self.centres[None, :]) ** 2


class ColourTokenizer:
    """Prompt strings -> (B, 1) int64: the index of the colour word in the prompt (records the prompts)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.prompts += texts
        ids = [next(i for i, c in enumerate(COLOURS) if c in t) for t in texts]
        return torch.tensor(ids, dtype=torch.long)[:, None]


class ColourEmbedder(nn.Module):
    """``encode_video`` = mean RGB of the clip; ``encode_text`` = the colour's axis in RGB."""

    def __init__(self) -> None:
        super().__init__()
        self.text_table = nn.Embedding(3, 3)
        with torch.no_grad():
            self.text_table.weight.copy_(torch.eye(3))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.mean(dim=(1, 3, 4))  # (B,3)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_table(tokens[:, 0])
