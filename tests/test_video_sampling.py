"""Frame samplers and clip transforms: exact indices, same random choice across frames."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from video.sampling import DenseSampler, TSNSampler, UniformSampler, build_sampler
from video.transforms import (ClipTransform, ClipTransformConfig, build_clip_transform, short_side_resize,
                              spatial_crop, to_float_clip)


def test_uniform_spans_first_to_last():
    clip = UniformSampler(5)(101, fps=25.0)
    assert clip.indices.tolist() == [0, 25, 50, 75, 100]
    assert torch.allclose(clip.times, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    assert UniformSampler(4)(2).indices.tolist() == [0, 0, 1, 1]


def test_tsn_test_mode_takes_segment_centres_and_views_shift():
    sampler = TSNSampler(4, train=False)
    assert sampler(40).indices.tolist() == [5, 15, 25, 35]
    assert sampler(40, view=0, num_views=2).indices.tolist() == [2, 12, 22, 32]
    assert sampler(40, view=1, num_views=2).indices.tolist() == [7, 17, 27, 37]


def test_tsn_train_is_random_within_segments_and_reproducible():
    sampler = TSNSampler(4, train=True)
    draws = [sampler(40, generator=torch.Generator().manual_seed(s)).indices for s in range(20)]
    for d in draws:
        assert all(10 * k <= i < 10 * (k + 1) for k, i in enumerate(d.tolist()))
    assert len({tuple(d.tolist()) for d in draws}) > 10
    again = sampler(40, generator=torch.Generator().manual_seed(3)).indices
    assert torch.equal(again, draws[3])


def test_dense_stride_start_and_short_video():
    sampler = DenseSampler(4, stride=3, train=False)
    assert sampler.span == 10
    assert sampler(30).indices.tolist() == [10, 13, 16, 19]
    assert sampler(30, view=0, num_views=3).indices.tolist() == [0, 3, 6, 9]
    assert sampler(30, view=2, num_views=3).indices.tolist() == [20, 23, 26, 29]
    assert sampler(5).indices.tolist() == [0, 3, 4, 4]  # clamped to the last frame
    train = DenseSampler(4, stride=3, train=True)
    starts = {train(30, generator=torch.Generator().manual_seed(s)).indices[0].item() for s in range(40)}
    assert starts <= set(range(21)) and len(starts) > 8


def test_frame_times_are_used_for_variable_rate():
    times = torch.tensor([0.0, 0.08, 0.1, 0.12, 0.2, 0.22])
    clip = UniformSampler(3)(6, frame_times=times)
    assert clip.indices.tolist() == [0, 2, 5]  # linspace 0..5 -> 0, 2.5 (rounds to 2), 5
    assert torch.allclose(clip.times, torch.tensor([0.0, 0.1, 0.22], dtype=torch.float64))


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="sampling 'random'"):
        build_sampler("random", 8)
    with pytest.raises(ValueError, match="clip_len"):
        TSNSampler(0)
    with pytest.raises(ValueError, match="num_frames"):
        UniformSampler(4)(0)


def test_to_float_and_short_side_resize():
    frames = torch.arange(2 * 4 * 6 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 4, 6, 3)
    clip = to_float_clip(frames)
    assert clip.shape == (2, 3, 4, 6)
    assert clip[1, 2, 3, 5].item() == pytest.approx(frames[1, 3, 5, 2].item() / 255)
    resized = short_side_resize(clip, 8)
    assert resized.shape == (2, 3, 8, 12)
    expect = F.interpolate(clip, size=(8, 12), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(resized, expect)
    with pytest.raises(ValueError, match="4-D"):
        to_float_clip(torch.zeros(4, 6, 3, dtype=torch.uint8))


def test_three_crops_cover_the_long_side():
    clip = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(2, 3, 4, 10)
    left, centre, right = (spatial_crop(clip, 4, i, 3) for i in range(3))
    assert left[0, 0, 0].tolist() == [0, 1, 2, 3]
    assert centre[0, 0, 0].tolist() == [3, 4, 5, 6]
    assert right[0, 0, 0].tolist() == [6, 7, 8, 9]
    tall = clip.transpose(-1, -2)
    assert spatial_crop(tall, 4, 2, 3)[0, 0, :, 0].tolist() == [6, 7, 8, 9]


def test_eval_transform_values():
    frames = torch.full((3, 20, 30, 3), 128, dtype=torch.uint8)
    frames[..., 1] = 255
    t = build_clip_transform(train=False, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = t(frames)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.full((3, 16, 16), (128 / 255 - 0.5) / 0.25), atol=1e-5)
    assert torch.allclose(out[:, 1], torch.full((3, 16, 16), 1.0), atol=1e-5)


def test_train_transform_is_identical_across_frames():
    base = torch.randint(0, 256, (1, 40, 50, 3), dtype=torch.uint8)
    frames = base.expand(4, -1, -1, -1).contiguous()
    t = ClipTransform(ClipTransformConfig(image_size=24, flip_prob=0.5), train=True)
    outs = [t(frames, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    for out in outs:
        assert out.shape == (4, 3, 24, 24)
        assert all(torch.equal(out[0], out[k]) for k in range(1, 4))
    assert len({round(o.sum().item(), 3) for o in outs}) > 1  # the draws differ between clips
    again = t(frames, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again, outs[2])
