"""Concealment: a wanted frame that cannot be decoded is replaced by the nearest one that can.

What decord and ffmpeg-based players do with damaged data, made explicit: the replaced indices are
returned (``VideoReader.last_concealed``, ``SampledClip.concealed``, the batch summaries), and a
request fails only when more than ``max_concealed`` of its frames (default 25%) had to be replaced.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from video.errors import VideoDecodeError

DEFAULT_MAX_CONCEALED = 0.25


def check_max_concealed(value: float) -> float:
    """``value`` as a float in [0, 1]; ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"max_concealed must be a fraction in [0, 1] of a request's frames, got {value!r}")
    return float(value)


def nearest(target: int, available: Iterable[int]) -> int | None:
    """The index in ``available`` closest to ``target`` (the earlier one on a tie); None when empty."""
    best = None
    for i in available:
        if best is None or abs(i - target) < abs(best - target) or (abs(i - target) == abs(best - target) and i < best):
            best = i
    return best


def assemble(path: str, num_frames: int, indices: list[int], got: dict[int, np.ndarray],
             replacements: dict[int, int], max_concealed: float, bad_packets: int = 0) -> tuple[np.ndarray, list[int]]:
    """(frames (T,H,W,3) for ``indices``, sorted concealed indices).

    ``got``: decoded frames by index; ``replacements``: missing index -> the index in ``got`` that
    stands in for it. VideoDecodeError when a frame has no stand-in or when more than
    ``max_concealed`` of the distinct requested frames are stand-ins.
    """
    wanted = sorted(set(indices))
    missing = [i for i in wanted if i not in got]
    if missing and len(missing) > max_concealed * len(wanted):
        raise VideoDecodeError(path, f"{len(missing)} of {len(wanted)} requested frames could not be decoded "
                                     f"(frames {missing[:8]} of {num_frames}; {bad_packets} corrupt packet(s)): "
                                     f"more than the {max_concealed:.0%} that may be concealed")
    lost = [i for i in missing if replacements.get(i) not in got]
    if lost:
        raise VideoDecodeError(path, f"frames {lost[:8]} of {num_frames} could not be decoded and no frame "
                                     f"near them decodes ({bad_packets} corrupt packet(s); the data is damaged)")
    return np.stack([got[i] if i in got else got[replacements[i]] for i in indices]), missing
