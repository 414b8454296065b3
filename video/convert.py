"""Decoded frame -> upright 8-bit RGB: one conversion for every decoder of the package.

- colour range: a frame flagged full-range (``color_range`` JPEG, e.g. MJPEG, phone HEVC) is
  converted as full range, a limited-range one as limited; swscale left alone assumes limited
  range for every non-``yuvj`` format, which lifts blacks and clips whites of full-range video;
- bit depth: 10/12-bit YUV is reduced to 8-bit RGB by swscale (its rounding);
- rotation: the display matrix that phones write (``frame.rotation``, counter-clockwise degrees) is
  applied, so a portrait clip stored sideways comes out upright (what players show);
- one swscale context per converter, on one thread (``to_ndarray`` builds a threaded context per
  frame: ~6x the CPU for a 320x240 frame). Pixels equal ``frame.to_ndarray(format="rgb24",
  src_color_range=...)`` rotated with ``numpy.rot90``.
"""
from __future__ import annotations

import numpy as np

FULL_RANGE = 2  # AVCOL_RANGE_JPEG
LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG


def quarter_turns(rotation: float | int | None) -> int:
    """Counter-clockwise quarter turns (0..3) for a display rotation in degrees (rounded to 90)."""
    if not rotation:
        return 0
    return int(round(float(rotation) / 90.0)) % 4


def upright(rgb: np.ndarray, turns: int) -> np.ndarray:
    """``rgb`` (H,W,3) turned ``turns`` quarter turns counter-clockwise, C-contiguous."""
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


class FrameConverter:
    """``convert(frame) -> uint8 (H,W,3)`` RGB, upright; see the module docstring."""

    def __init__(self) -> None:
        self._reformatter = None
        self.rotation = 0  # counter-clockwise degrees of the last frame converted
        self.color_range = 0  # AVColorRange of the last frame converted (0: unspecified)

    def convert(self, frame) -> np.ndarray:
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        colour = int(frame.color_range)
        src_range = colour if colour in (FULL_RANGE, LIMITED_RANGE) else None
        rgb = self._reformatter.reformat(frame, format="rgb24", src_color_range=src_range, threads=1).to_ndarray()
        self.rotation = int(frame.rotation or 0)
        self.color_range = colour
        return upright(rgb, quarter_turns(self.rotation))
