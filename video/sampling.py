"""Frame samplers: which frame indices make a clip.

Every sampler is called as ``sampler(num_frames, fps=..., frame_times=None, generator=None)``
and returns a :class:`SampledClip` (indices (T,) int64 and their times (T,) float64 in
seconds). Randomness comes only from the explicit ``torch.Generator``.

- :class:`UniformSampler`: T frames evenly spread from the first frame to the last.
- :class:`TSNSampler`: the video cut into T equal segments; one frame per segment,
  at a random offset (training) or at the segment centre (testing). Multi-view
  testing shifts the offset by ``view / num_views``.
- :class:`DenseSampler`: T frames ``stride`` apart (SlowFast / I3D style) from a
  random start (training) or from evenly spaced starts (testing views).

Indices past the end: a sampler never returns one. ``num_frames`` is ``len(reader)``, the frames
that decode (a header that promises more is not trusted), and every sampler clamps into
``[0, num_frames - 1]``: a video shorter than the clip repeats frames (uniform, TSN) or its last
frame (dense). The reader itself refuses an index past the end with a ValueError naming the valid
range; it never guesses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLINGS = ("uniform", "tsn", "dense")


@dataclass(frozen=True)
class SampledClip:
    """Frame ``indices`` (T,) int64 and their ``times`` (T,) float64 seconds from the first frame.

    ``concealed``: the indices whose frame did not decode and was replaced by the nearest decodable
    one (set by the datasets after decoding; empty for a clean clip).
    """

    indices: torch.Tensor
    times: torch.Tensor
    concealed: tuple[int, ...] = ()


def _times(indices: torch.Tensor, fps: float, frame_times: torch.Tensor | None) -> torch.Tensor:
    if frame_times is not None:
        return frame_times.to(torch.float64)[indices]
    return indices.to(torch.float64) / float(fps)


def _check(num_frames: int, fps: float) -> None:
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames (frames in the video) must be a positive int, got {num_frames!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class UniformSampler:
    """``clip_len`` frames evenly spaced from frame 0 to the last frame (deterministic)."""

    def __init__(self, clip_len: int) -> None:
        self.clip_len = _positive("clip_len", clip_len)

    def __call__(self, num_frames: int, fps: float = 25.0, frame_times: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, view: int = 0, num_views: int = 1) -> SampledClip:
        _check(num_frames, fps)
        if num_views > 1:  # views shift the grid by a fraction of one step
            step = num_frames / self.clip_len
            pos = torch.arange(self.clip_len, dtype=torch.float64) * step + step * view / num_views
        else:
            pos = torch.linspace(0, num_frames - 1, self.clip_len, dtype=torch.float64)
        indices = pos.round().long().clamp_(0, num_frames - 1)
        return SampledClip(indices, _times(indices, fps, frame_times))


class TSNSampler:
    """TSN segment sampling: one frame per each of ``clip_len`` equal segments.

    ``train=True``: a random offset inside each segment (from ``generator``);
    otherwise the centre (or, for view v of V, the point (v + 0.5) / V into each segment).
    """

    def __init__(self, clip_len: int, train: bool = False) -> None:
        self.clip_len = _positive("clip_len", clip_len)
        self.train = bool(train)

    def __call__(self, num_frames: int, fps: float = 25.0, frame_times: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, view: int = 0, num_views: int = 1) -> SampledClip:
        _check(num_frames, fps)
        seg = num_frames / self.clip_len
        starts = torch.arange(self.clip_len, dtype=torch.float64) * seg
        if self.train:
            offsets = torch.rand(self.clip_len, generator=generator, dtype=torch.float64) * seg
        else:
            offsets = torch.full((self.clip_len,), seg * (view + 0.5) / num_views, dtype=torch.float64)
        indices = (starts + offsets).floor().long().clamp_(0, num_frames - 1)
        return SampledClip(indices, _times(indices, fps, frame_times))


class DenseSampler:
    """``clip_len`` frames ``stride`` apart; random start (train) or evenly spaced views (test).

    Shorter videos repeat their last frame (indices are clamped).
    """

    def __init__(self, clip_len: int, stride: int = 2, train: bool = False) -> None:
        self.clip_len = _positive("clip_len", clip_len)
        self.stride = _positive("stride", stride)
        self.train = bool(train)

    @property
    def span(self) -> int:
        """Frames covered by one clip."""
        return (self.clip_len - 1) * self.stride + 1

    def __call__(self, num_frames: int, fps: float = 25.0, frame_times: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, view: int = 0, num_views: int = 1) -> SampledClip:
        _check(num_frames, fps)
        room = max(num_frames - self.span, 0)
        if self.train:
            start = int(torch.randint(room + 1, (1,), generator=generator).item())
        elif num_views > 1:
            start = round(room * view / (num_views - 1))
        else:
            start = room // 2
        indices = (start + torch.arange(self.clip_len) * self.stride).clamp_(0, num_frames - 1)
        return SampledClip(indices, _times(indices, fps, frame_times))


def build_sampler(sampling: str, clip_len: int, train: bool = False, stride: int = 2):
    """A sampler by name: "uniform", "tsn" or "dense"."""
    if sampling == "uniform":
        return UniformSampler(clip_len)
    if sampling == "tsn":
        return TSNSampler(clip_len, train=train)
    if sampling == "dense":
        return DenseSampler(clip_len, stride=stride, train=train)
    raise ValueError(f"sampling {sampling!r} is not one of: {', '.join(SAMPLINGS)}")
