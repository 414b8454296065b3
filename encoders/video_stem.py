"""The convolutional input stage of the video encoder (``VideoEncoderConfig.conv_stem``) and its 2D
counterpart in the image encoder (``ImageEncoderConfig.conv_stem``, see :func:`image_conv_stem`).

``ConvStemConfig(channels=(C1, ..., Cn), frame_diff=False)`` describes a convolutional tokenizer
("early convolutions"): n blocks of 3x3x3 Conv3d (no bias), BatchNorm3d and GELU, stride 2 in space
in the first blocks and stride 2 in time in the last blocks as far as the patch size and tubelet size
allow (``stem_strides``); the patch embedding then covers what is left of the patch and tubelet.

``frame_diff=True`` appends the temporal differences of the frames to the pixels before the first
layer (TSN's RGB difference, TDN): channel-wise ``x[t] - x[t-1]`` (zero for the first frame), so the
stem sees (B, 2 * in_chans, T, H, W). Motion is then explicit in the input instead of something the
first convolutions must learn to compute from a few hundred clips; the cost is one subtraction.
``channels=()`` with ``frame_diff=True`` keeps the linear tubelet embedding, over pixels and differences.

``time_kernel`` (odd, default 3) is the blocks' kernel size in time. ``time_kernel=1`` makes them 1x3x3: each
frame is tokenized from itself alone (with ``frame_diff=False`` and ``tubelet_size=1`` no token sees a second
frame), the stem of a frame-wise ablation.

The image encoder's tokenizer is the same with 3x3 Conv2d / BatchNorm2d blocks, strided in space by the
same rule (``spatial_strides``); ``frame_diff`` and ``time_kernel`` have no meaning there and are refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ConvStemConfig:
    """The stem's blocks (output channels each, in order), whether frame differences are added, and the
    blocks' kernel size in time."""

    channels: tuple[int, ...] = ()
    frame_diff: bool = False
    time_kernel: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):
            self.channels = tuple(self.channels)  # JSON gives lists
        if not isinstance(self.channels, tuple) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels):
            raise ValueError(f"conv_stem channels must list positive ints (channels per block), got {self.channels!r}")
        if not isinstance(self.frame_diff, bool):
            raise ValueError(f"conv_stem frame_diff must be a bool, got {self.frame_diff!r}")
        if not isinstance(self.time_kernel, int) or isinstance(self.time_kernel, bool) or self.time_kernel < 1 \
                or self.time_kernel % 2 == 0:
            raise ValueError(f"conv_stem time_kernel must be an odd int >= 1 (1, 3, 5, ...), got {self.time_kernel!r}")
        if not self.channels and not self.frame_diff:
            raise ValueError("conv_stem with no blocks and frame_diff=False is no stem; use conv_stem=0")

    @classmethod
    def parse(cls, value: object) -> "ConvStemConfig":
        """A ``ConvStemConfig`` from itself, a sequence of channels or a dict of its fields (ValueError otherwise)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("conv_stem as a sequence must list positive ints (channels per block), got ()")
            return cls(channels=tuple(value))
        if isinstance(value, dict):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(valid))
            if unknown:
                raise ValueError(f"conv_stem: unknown key(s) {unknown}; valid keys: {valid}")
            return cls(**value)
        raise ValueError(f"conv_stem must be an int >= 0, a sequence of channels or a dict with keys "
                         f"{[f.name for f in dataclasses.fields(cls)]}, got {value!r}")

    def input_channels(self, in_chans: int) -> int:
        """Channels the first layer sees: the pixels, and their differences with ``frame_diff``."""
        return 2 * in_chans if self.frame_diff else in_chans


def frame_differences(x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, 2C, T, H, W): the frames, then ``x[t] - x[t-1]`` (zeros at t = 0).

    Written in one pass into one tensor of ``memory_format`` (``torch.channels_last_3d`` is what the conv
    tokenizer reads): the pixels are copied in, and the differences are taken from that copy straight into
    the second half of the channels, so no concatenation or layout conversion follows. Where ``x`` needs
    gradients the differences go through autograd instead (same values)."""
    b, c, t, h, w = x.shape
    out = torch.empty((b, 2 * c, t, h, w), dtype=x.dtype, device=x.device, memory_format=memory_format)
    out[:, c:, :1].zero_()
    out[:, :c] = x
    if torch.is_grad_enabled() and x.requires_grad:
        out[:, c:, 1:] = x[:, :, 1:] - x[:, :, :-1]
    else:
        torch.sub(out[:, :c, 1:], out[:, :c, :-1], out=out[:, c:, 1:])
    return out


def stem_strides(num_blocks: int, patch: tuple[int, int], tubelet: int) -> list[tuple[int, int, int]]:
    """(t, h, w) strides of a ``num_blocks``-block conv tokenizer: 2 in space in the first blocks while it
    divides the patch size, 2 in time in the last blocks while it divides the tubelet size, else 1."""

    def halvings(n: int) -> int:
        return min(num_blocks, (n & -n).bit_length() - 1)  # times 2 divides n, at most one per block

    sh, sw, st = halvings(patch[0]), halvings(patch[1]), halvings(tubelet)
    return [(2 if i >= num_blocks - st else 1, 2 if i < sh else 1, 2 if i < sw else 1) for i in range(num_blocks)]


def spatial_strides(num_blocks: int, patch: tuple[int, int]) -> list[tuple[int, int]]:
    """(h, w) strides of a ``num_blocks``-block 2D tokenizer: ``stem_strides`` of a one-frame tubelet, in space."""
    return [(sh, sw) for _, sh, sw in stem_strides(num_blocks, patch, 1)]


def remaining_patch(size: tuple[int, ...], strides: list[tuple[int, ...]]) -> tuple[int, ...]:
    """What the blocks leave of a patch (or tubelet x patch) ``size`` for the patch embedding to cover."""
    for stride in strides:
        size = tuple(n // s for n, s in zip(size, stride))
    return size


def conv_tokenizer(in_chans: int, channels: tuple[int, ...], strides: list[tuple[int, ...]],
                   time_kernel: int = 3) -> nn.Sequential:
    """(B, in_chans, T, H, W) -> (B, channels[-1], T / prod t-strides, H / prod h-strides, W / ...);
    each block a ``time_kernel`` x 3 x 3 convolution (padded to keep the size before its stride).
    With (h, w) strides the blocks are 3x3 Conv2d and BatchNorm2d over images (B, in_chans, H, W)."""
    if strides and len(strides[0]) == 2:
        conv, norm, kernel, padding = nn.Conv2d, nn.BatchNorm2d, (3, 3), (1, 1)
    else:
        conv, norm, kernel, padding = nn.Conv3d, nn.BatchNorm3d, (time_kernel, 3, 3), (time_kernel // 2, 1, 1)
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip((in_chans, *channels[:-1]), channels, strides):
        layers += [conv(c_in, c_out, kernel, stride, padding=padding, bias=False), norm(c_out), nn.GELU()]
    return nn.Sequential(*layers)


def image_conv_stem(value: object) -> int | ConvStemConfig:
    """``ImageEncoderConfig.conv_stem`` checked: 0 (the linear patch embedding) or a ``ConvStemConfig`` with
    blocks and no time settings (from a sequence of channels or a dict); ValueError naming the value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        if value == 0:
            return 0
        raise ValueError(f"image encoder conv_stem={value!r}: an image encoder takes 0 (the linear patch "
                         "embedding), a sequence of channels per block (e.g. [16, 32, 64]) or a dict with key "
                         "'channels'; a single int (the video encoder's one-convolution stem) is not an image stem")
    stem = ConvStemConfig.parse(value)  # ValueError for anything else
    if stem.frame_diff:
        raise ValueError(f"image encoder conv_stem frame_diff={stem.frame_diff!r}: frame differences need frames; "
                         "an image has one (set frame_diff in the video encoder's conv_stem)")
    default = ConvStemConfig.__dataclass_fields__["time_kernel"].default
    if stem.time_kernel != default:
        raise ValueError(f"image encoder conv_stem time_kernel={stem.time_kernel!r}: an image has no time axis; "
                         f"leave it at {default} (set time_kernel in the video encoder's conv_stem)")
    return stem
