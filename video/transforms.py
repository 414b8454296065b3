"""Clip transforms on tensors, the same for every frame of a clip.

A clip enters as decoded frames, uint8 (T,H,W,3), and leaves as float32
(T,3,S,S) normalised with the model's mean and std. Random choices (crop box,
flip) are drawn once per clip from an explicit ``torch.Generator``.

Training: random resized crop -> flip -> normalise.
Testing: short-side resize -> centre crop (or one of three crops along the long
side for multi-view testing) -> normalise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_float_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T,H,W,3) -> float32 (T,3,H,W) in [0,1]; a float (T,3,H,W) clip passes through."""
    if frames.dim() != 4:
        raise ValueError(f"a clip must be 4-D, (T,H,W,3) uint8 or (T,3,H,W) float; got shape {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        if frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T,H,W,3), got shape {tuple(frames.shape)}")
        return frames.permute(0, 3, 1, 2).float().div_(255.0)
    if not frames.dtype.is_floating_point or frames.shape[1] != 3:
        raise ValueError(f"a float clip must be (T,3,H,W), got {frames.dtype} {tuple(frames.shape)}")
    return frames.float()


def resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of (T,3,H,W) to ``size`` = (h, w)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True)


def short_side_resize(clip: torch.Tensor, short_side: int) -> torch.Tensor:
    """Resize (T,3,H,W) so that min(H, W) == ``short_side``, keeping the aspect ratio."""
    h, w = clip.shape[-2:]
    scale = short_side / min(h, w)
    return resize(clip, (max(round(h * scale), short_side), max(round(w * scale), short_side)))


def crop(clip: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return clip[..., top:top + height, left:left + width]


def spatial_crop(clip: torch.Tensor, size: int, index: int, num_crops: int) -> torch.Tensor:
    """Crop ``index`` of ``num_crops`` squares spread along the long side (1 = centre, 3 = start/centre/end)."""
    h, w = clip.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {h}x{w}; resize first")
    if not 0 <= index < num_crops:
        raise ValueError(f"crop index {index} must be in [0, {num_crops})")
    frac = 0.5 if num_crops == 1 else index / (num_crops - 1)
    if h >= w:
        top, left = round((h - size) * frac), (w - size) // 2
    else:
        top, left = (h - size) // 2, round((w - size) * frac)
    return crop(clip, top, left, size, size)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random box with area fraction in ``scale`` and aspect in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator, dtype=torch.float64)
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0].item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1].item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    side = min(height, width)  # fallback: centre square
    return (height - side) // 2, (width - side) // 2, side, side


def normalize(clip: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=clip.dtype).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=clip.dtype).view(1, 3, 1, 1)
    return (clip - mean_t) / std_t


@dataclass
class ClipTransformConfig:
    """Settings of :class:`ClipTransform`. ``short_side`` defaults to ``image_size`` (CLIP style)."""

    image_size: int = 224
    short_side: int | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    train_scale: tuple[float, float] = (0.25, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.short_side is not None and self.short_side < self.image_size:
            raise ValueError(f"short_side {self.short_side} must be >= image_size {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got {self.mean!r} and {self.std!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")


class ClipTransform:
    """Frames uint8 (T,H,W,3) -> float32 (T,3,S,S), normalised; one random draw per clip.

    ``clip_transform(frames, generator=None, crop_index=0, num_crops=1)``; the crop
    arguments choose the spatial view when testing.
    """

    def __init__(self, config: ClipTransformConfig | None = None, train: bool = False) -> None:
        self.config = config or ClipTransformConfig()
        self.train = bool(train)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def __call__(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                 crop_index: int = 0, num_crops: int = 1) -> torch.Tensor:
        cfg = self.config
        clip = to_float_clip(frames)
        size = cfg.image_size
        if self.train:
            top, left, h, w = random_resized_crop_box(clip.shape[-2], clip.shape[-1], cfg.train_scale, cfg.train_ratio, generator)
            clip = resize(crop(clip, top, left, h, w), (size, size))
            if cfg.flip_prob > 0 and torch.rand((), generator=generator).item() < cfg.flip_prob:
                clip = clip.flip(-1)
        else:
            clip = short_side_resize(clip, cfg.short_side or size)
            clip = spatial_crop(clip, size, crop_index if num_crops > 1 else 0, num_crops)
        return normalize(clip.contiguous(), cfg.mean, cfg.std)

    def __repr__(self) -> str:
        return f"ClipTransform(train={self.train}, {self.config})"


def build_clip_transform(train: bool = False, image_size: int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                         short_side: int | None = None) -> ClipTransform:
    """A :class:`ClipTransform` from the model's ``image_size``, ``mean`` and ``std``."""
    return ClipTransform(ClipTransformConfig(image_size=image_size, short_side=short_side,
                                             mean=tuple(mean), std=tuple(std)), train=train)
