"""Held-out clips take the frames a training clip without temporal jitter takes: the trainer caches
clips with 2T frames for jitter and picks T of them (``temporal_indices(jitter=False)``), while held-out
clips are decoded at T frames directly (``video_dataset(train=False)``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from ernie_vl.data.sources import video_dataset  # noqa: E402
from ernie_vl.data.synthetic import write_mp4  # noqa: E402
from video.clip_mixing import temporal_indices  # noqa: E402


def _write(root, frames: int) -> None:
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    clip = np.zeros((frames, 32, 32, 3), dtype=np.uint8)
    for i in range(frames):  # every frame distinct: a moving bright square on noise
        clip[i] = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        clip[i, 8:16, i:i + 8] = 255
    write_mp4(root / "a" / "clip.mp4", clip, fps=16)


@pytest.mark.parametrize("source_frames", [16, 17])
def test_held_out_frames_equal_the_unjittered_training_frames(tmp_path, source_frames):
    _write(tmp_path, source_frames)
    t = 8
    stats = ((0.5,) * 3, (0.5,) * 3)
    held_out = video_dataset(tmp_path, t, 32, *stats, train=False)
    cached = video_dataset(tmp_path, 2 * t, 32, *stats, train=False)
    picked = temporal_indices(2 * t, t, 1, jitter=False)[0]
    assert picked.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    direct = held_out.sampler(source_frames).indices
    via_cache = cached.sampler(source_frames).indices[picked]
    if source_frames == 2 * t:
        assert direct.tolist() == via_cache.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
        torch.testing.assert_close(held_out[0][0], cached[0][0][picked])  # the decoded pixels, not just indices
    else:  # otherwise within one frame of each other, both steady steps
        assert (direct - via_cache).abs().max() <= 1
    steps = direct.diff()
    assert int(steps.max() - steps.min()) <= 1
