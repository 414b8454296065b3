"""The one output dataclass of every visual encoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    """What ``ImageEncoder`` / ``VideoEncoder`` return.

    Attributes:
        tokens: (B, L, C) all tokens after the final norm. Images: ``[cls, patches]``
            with patches in row-major (h, w) order, L = 1 + gh*gw. Videos: the class
            token(s) first (1 in ``shared`` mode, T in ``per_frame`` mode, one per
            frame), then the patches ordered position-major, frame-minor
            ((h, w, t), the order of Hugging Face TimeSformer's ``last_hidden_state``).
        pooled: (B, E) after pooling (class token or patch mean) and the optional
            projection head (E = C without one).
        active_head_ratio: (num_layers,) float tensor, the share of attention heads
            active per layer averaged over the batch, or None when gating is off.
        grid: (gh, gw), the patch grid of this input.
        num_frames: T (1 for images).
        num_prefix_tokens: how many class tokens lead ``tokens``.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    active_head_ratio: torch.Tensor | None
    grid: tuple[int, int]
    num_frames: int = 1
    num_prefix_tokens: int = 1

    @property
    def patch_tokens(self) -> torch.Tensor:
        """(B, gh*gw*T, C): ``tokens`` without the class token(s)."""
        return self.tokens[:, self.num_prefix_tokens :]
