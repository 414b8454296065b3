"""Tiny configs shared by the encoder tests."""
from __future__ import annotations

import torch

from encoders import ImageEncoderConfig, VideoEncoderConfig


def tiny_image_cfg(**overrides) -> ImageEncoderConfig:
    kw = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_ratio=2.0, embed_dim=16)
    kw.update(overrides)
    return ImageEncoderConfig(**kw)


def tiny_video_cfg(**overrides) -> VideoEncoderConfig:
    kw = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_ratio=2.0, num_frames=4)
    kw.update(overrides)
    return VideoEncoderConfig(**kw)


def randomize_(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with noise (so zero-initialised branches matter too)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def params_without_grad(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
