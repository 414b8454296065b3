"""Image augmentation for image-text training: random resized crops and rotations on the step's batch,
the same choices on every rank, exact resume, and its use by the trainer."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ernie_vl.data.image_augment import ImageAugmentConfig, ImageAugmenter
from video.clip_mixing import crop_resize


def _ramp(b=2, h=8, w=8):
    """(b,3,h,w) with a distinct value at every pixel."""
    return torch.arange(b * 3 * h * w, dtype=torch.float32).reshape(b, 3, h, w)


def test_rotation_turns_counter_clockwise_in_pixel_space():
    x = _ramp()[:, None]  # (B,1,C,H,W)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, dtype=torch.float64)
    quarter = crop_resize(x, whole, torch.full((2,), math.pi / 2))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(crop_resize(x, whole, torch.full((2,), -math.pi / 2)),
                               torch.rot90(x, -1, dims=(-2, -1)), atol=1e-4, rtol=0)
    # on a frame twice as wide as tall a half turn is exact too (no shear from the normalised coordinates)
    wide = _ramp(1, 4, 8)[:, None]
    torch.testing.assert_close(crop_resize(wide, whole[:1], torch.full((1,), math.pi)), wide.flip(-1, -2),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(crop_resize(x, whole, torch.zeros(2)), x)


def test_config_refuses_values_out_of_range_naming_the_flag():
    with pytest.raises(ValueError, match=r"--image-crop-min-area.*\(0, 1\].*got 0"):
        ImageAugmentConfig(crop_min_area=0.0)
    with pytest.raises(ValueError, match=r"--image-rotate.*\[0, 180\).*got -5"):
        ImageAugmentConfig(rotate_degrees=-5)
    assert not ImageAugmentConfig().enabled
    assert ImageAugmentConfig(0.9).enabled and ImageAugmentConfig(1.0, 10).enabled


def test_crops_change_pixels_keep_a_flat_image_flat_and_follow_the_seed():
    images = torch.randn(16, 3, 32, 32)
    aug = ImageAugmenter(ImageAugmentConfig(crop_min_area=0.5, rotate_degrees=15), seed=3)
    out = aug(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    changed = (out - images).abs().flatten(1).amax(1)
    assert bool((changed > 0.1).all()), changed  # every image got its own new view
    again = ImageAugmenter(ImageAugmentConfig(crop_min_area=0.5, rotate_degrees=15), seed=3)(images)
    torch.testing.assert_close(out, again)
    flat = torch.full((4, 3, 32, 32), 0.25)
    torch.testing.assert_close(aug(flat), flat)  # border padding: a rotated flat image stays flat
    # rotation alone keeps the whole frame: the centre pixel of a frame never moves
    turn = ImageAugmenter(ImageAugmentConfig(rotate_degrees=30), seed=0)(images[:, :, :31, :31])
    torch.testing.assert_close(turn[..., 15, 15], images[:, :, 15, 15], atol=1e-5, rtol=0)


def test_each_rank_gets_its_slice_of_one_global_draw_and_state_resumes_exactly():
    cfg = ImageAugmentConfig(crop_min_area=0.6, rotate_degrees=10)
    images = torch.randn(8, 3, 16, 16)
    whole = ImageAugmenter(cfg, seed=1)(images)
    for rank in (0, 1):
        part = ImageAugmenter(cfg, seed=1)(images[rank * 4:(rank + 1) * 4], global_batch=8, rank=rank)
        torch.testing.assert_close(part, whole[rank * 4:(rank + 1) * 4])
    first = ImageAugmenter(cfg, seed=1)
    first(images)
    state = first.state_dict()
    expected = first(images)
    resumed = ImageAugmenter(cfg, seed=99)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(images), expected)
    with pytest.raises(ValueError, match="global batch 4 is smaller"):
        ImageAugmenter(cfg)(images[:4], global_batch=4, rank=1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 16, 16\)"):
        ImageAugmenter(cfg)(images[0])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from _train_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("imgaug"))


def test_training_with_image_augmentation_logs_it_changes_the_run_and_resumes_exactly(tiny_data, tmp_path):
    from _train_helpers import read_log, tiny_config

    from ernie_vl.train import TrainConfig, train

    with pytest.raises(ValueError, match="--image-rotate"):
        tiny_config(tiny_data, tmp_path / "bad", image_rotate=200)
    kw = dict(max_steps=6, videos=[], image_crop_min_area=0.7, image_rotate=10)
    full = train(tiny_config(tiny_data, tmp_path / "full", **kw))
    train(tiny_config(tiny_data, tmp_path / "part", **kw), stop_after=3)
    rest = train(tiny_config(tiny_data, tmp_path / "part", resume=True, **kw))
    plain = train(tiny_config(tiny_data, tmp_path / "plain", max_steps=6, videos=[]))
    assert full.steps == rest.steps == plain.steps == 6
    setup = json.loads((tmp_path / "full" / "setup.json").read_text())
    assert setup["image_augment"] == {"crop_area": [0.7, 1.0], "rotate_degrees": 10}
    assert "image_augment" not in json.loads((tmp_path / "plain" / "setup.json").read_text())
    log_full, log_part, log_plain = (read_log(tmp_path / n) for n in ("full", "part", "plain"))
    assert [r["step"] for r in log_part] == list(range(1, 7))
    for a, b in zip(log_full, log_part):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0)
    # the first step's loss differs from the plain run's only by the augmented pixels (same init, same batch)
    assert abs(log_full[0]["loss"] - log_plain[0]["loss"]) > 1e-6
    assert TrainConfig.from_dict(tiny_config(tiny_data, tmp_path / "x", **kw).to_dict()).image_rotate == 10


def test_cli_flags_reach_the_config():
    import argparse

    from ernie_vl.train.arguments import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args(["--pairs", "a.csv", "--out", "o", "--max-steps", "1",
                                         "--image-crop-min-area", "0.9", "--image-rotate", "8"]))
    assert (cfg.image_crop_min_area, cfg.image_rotate) == (0.9, 8.0)
    default = config_from_args(p.parse_args(["--pairs", "a.csv", "--out", "o", "--max-steps", "1"]))
    assert (default.image_crop_min_area, default.image_rotate) == (1.0, 0.0)


def test_streamed_pairs_are_augmented_too(tiny_data, tmp_path, monkeypatch):
    """The augmenter runs on the step's batch whatever the source: here the streaming one (cache budget 0)."""
    from _train_helpers import tiny_config

    from ernie_vl.train.trainer import Trainer

    cfg = tiny_config(tiny_data, tmp_path / "s", max_steps=2, videos=[], cache_max_mb=0.0, image_crop_min_area=0.5)
    trainer = Trainer(cfg)
    assert trainer.streaming and trainer.image_augmenter is not None
    seen = []
    real = ImageAugmenter.__call__

    def spy(self, images, global_batch=None, rank=0):
        out = real(self, images, global_batch, rank)
        seen.append((tuple(images.shape), global_batch, float((out - images).abs().max())))
        return out

    monkeypatch.setattr(ImageAugmenter, "__call__", spy)
    trainer.train_step()
    assert len(seen) == 1 and seen[0][:2] == ((8, 3, 32, 32), 8) and seen[0][2] > 0.01
