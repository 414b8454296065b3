"""The video encoder sees time: tubelet embedding parity, time-embedding init, and a briefly
trained divided encoder that tells left from right motion (an order-blind one cannot: a
clip of ``move_left`` played backwards is a ``move_right`` clip)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoders.convert import video_encoder_from_image_encoder
from encoders.video_stem import ConvStemConfig
from encoders.video_vit import VideoEncoder, VideoEncoderConfig
from encoders.vit import ImageEncoder, ImageEncoderConfig
from ernie_vl.data.synthetic import motion_frames

PRESETS = Path(__file__).resolve().parents[1] / "ernie_vl" / "preset_configs"
SMALL = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0)  # the `test` preset


def tiny_video_settings() -> dict:
    """The temporal settings of the ``tiny`` preset (what the trained model uses)."""
    video = json.loads((PRESETS / "tiny.json").read_text())["video_encoder"]
    return {k: video[k] for k in ("attention", "cls_mode", "tubelet_size") if k in video}


def test_tubelet_embedding_equals_summed_per_frame_convolutions():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=2))
    clips = torch.randn(2, 4, 3, 32, 32)
    tokens, grid = enc.embed_clip(clips)
    assert grid == (4, 4) and tokens.shape == (2, 2, 16, 32)
    # slow path: a 3D conv over k frames = the sum of k 2D convs with the kernel's time slices
    w, b = enc.patch_embed.weight, enc.patch_embed.bias
    for step in range(2):
        out = sum(F.conv2d(clips[:, 2 * step + i], w[:, :, i], None, stride=8) for i in range(2)) + b[None, :, None, None]
        expected = out.flatten(2).transpose(1, 2) + enc.pos_embed[1:]
        torch.testing.assert_close(tokens[:, step], expected, rtol=1e-5, atol=1e-5)
    out = enc(clips)
    assert out.num_frames == 2 and out.tokens.shape == (2, 1 + 2 * 16, 32)


def test_tubelet_of_one_is_the_per_frame_patch_embedding():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4))
    assert isinstance(enc.patch_embed, nn.Conv2d)
    clips = torch.randn(2, 4, 3, 32, 32)
    tokens, _ = enc.embed_clip(clips)
    per_frame, _ = enc.embed_patches(clips.flatten(0, 1))
    torch.testing.assert_close(tokens, per_frame.reshape(2, 4, 16, 32), rtol=0, atol=0)


@pytest.mark.parametrize("tubelet", [1, 2])
def test_conv_stem_is_a_gelu_of_a_3x3x3_convolution_then_the_patch_embedding(tubelet):
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=tubelet, conv_stem=6))
    clips = torch.randn(2, 4, 3, 32, 32)
    tokens, grid = enc.embed_clip(clips)
    conv = enc.stem[0]
    # by hand: same-padded 3x3x3 convolution, exact GELU, then a (k, 8, 8) patch convolution
    feats = F.gelu(F.conv3d(clips.transpose(1, 2), conv.weight, conv.bias, padding=1))
    assert feats.shape == (2, 6, 4, 32, 32)
    patches = F.conv3d(feats, enc.patch_embed.weight, enc.patch_embed.bias, stride=(tubelet, 8, 8))
    expected = patches.permute(0, 2, 3, 4, 1).flatten(2, 3) + enc.pos_embed[1:]
    assert grid == (4, 4) and tokens.shape == (2, 4 // tubelet, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    out = enc(torch.randn(2, 8 if tubelet == 2 else 2, 3, 32, 32))  # another frame count than configured
    assert torch.isfinite(out.pooled).all()
    with pytest.raises(ValueError, match="conv_stem must be an int >= 0"):
        VideoEncoderConfig(**SMALL, num_frames=4, conv_stem=-1)


def test_frame_count_must_split_into_tubelets():
    with pytest.raises(ValueError, match="num_frames=6 is not divisible by tubelet_size=4"):
        VideoEncoderConfig(**SMALL, num_frames=6, tubelet_size=4)
    with pytest.raises(ValueError, match="tubelet_size must be a positive int"):
        VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=2))
    with pytest.raises(ValueError, match="clip frames T=3 is not divisible by tubelet_size=2"):
        enc(torch.zeros(1, 3, 3, 32, 32))


def test_time_embedding_is_random_from_scratch_and_zero_when_inflated():
    torch.manual_seed(0)
    scratch = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4))
    assert scratch.time_embed.shape == (4, 32)
    assert 0.005 < scratch.time_embed.std().item() < 0.05  # trunc-normal 0.02: the frames differ at init
    inflated = video_encoder_from_image_encoder(ImageEncoder(ImageEncoderConfig(**SMALL)), 4, "divided")
    assert torch.count_nonzero(inflated.time_embed) == 0  # inflation stays an exact per-frame image encoder


def _left_right_clips(count: int, seed: int, num_frames: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, T, 3, 32, 32) clips in [-1, 1] alternating move_left (0) / move_right (1)."""
    clips, labels = [], []
    for i in range(count):
        label = i % 2
        rng = np.random.default_rng([seed, i])
        frames = motion_frames(rng, ("move_left", "move_right")[label], num_frames, 32)
        clips.append(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        labels.append(label)
    return torch.stack(clips), torch.tensor(labels)


def train_left_right(settings: dict, steps: int = 150, seed: int = 0) -> tuple[VideoEncoder, nn.Linear]:
    """A small divided video encoder + linear classifier trained ``steps`` full-batch AdamW steps
    (one thread: tiny ops, and deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(settings, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(settings: dict, steps: int, seed: int) -> tuple[VideoEncoder, nn.Linear]:
    torch.manual_seed(seed)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=8, embed_dim=None, **settings))
    head = nn.Linear(32, 2)
    clips, labels = _left_right_clips(32, seed=1)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(head(enc(clips).pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc.eval(), head


def test_trained_divided_encoder_sees_the_direction_of_motion():
    enc, head = train_left_right(tiny_video_settings())
    clips, labels = _left_right_clips(32, seed=2)  # held-out clips
    with torch.no_grad():
        forward, backward = enc(clips).pooled, enc(clips.flip(1)).pooled
        accuracy = (head(forward).argmax(-1) == labels).float().mean().item()
    change = ((forward - backward).norm(dim=-1) / forward.norm(dim=-1)).mean().item()
    assert change > 0.1, f"reversing the frames barely changes the embedding (relative change {change:.4f})"
    assert accuracy >= 0.8, f"left-vs-right held-out accuracy {accuracy:.3f} (chance 0.5)"


def test_inflated_tubelet_encoder_embeds_a_still_clip_as_the_image():
    torch.manual_seed(0)
    image = ImageEncoder(ImageEncoderConfig(**SMALL)).eval()
    video = video_encoder_from_image_encoder(image, 4, "divided", "per_frame", tubelet_size=2).eval()
    assert video.patch_embed.weight.shape == (32, 3, 2, 8, 8)
    frame = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        still = video(frame[:, None].expand(2, 4, 3, 32, 32).contiguous())
        torch.testing.assert_close(still.pooled, image(frame).pooled, rtol=1e-4, atol=1e-5)


def test_conv_tokenizer_strides_follow_the_patch_and_tubelet_sizes():
    from encoders.video_vit import stem_strides

    assert stem_strides(3, (8, 8), 4) == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]  # tiny: the blocks do all of it
    assert stem_strides(2, (8, 8), 4) == [(2, 2, 2), (2, 2, 2)]  # a (1, 2, 2) patch convolution is left
    assert stem_strides(3, (4, 4), 1) == [(1, 2, 2), (1, 2, 2), (1, 1, 1)]
    assert stem_strides(2, (6, 6), 2) == [(1, 2, 2), (2, 1, 1)]  # 6 halves once


def test_conv_tokenizer_equals_its_blocks_computed_by_hand():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=2, conv_stem=[5, 6]))
    assert enc.cfg.conv_stem == ConvStemConfig(channels=(5, 6))  # a list of channels is a tokenizer config
    for m in enc.stem.modules():  # non-trivial batch-norm statistics and affine terms
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    enc.eval()
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = enc.embed_clip(clips)
    x = clips.transpose(1, 2)
    convs = [m for m in enc.stem if isinstance(m, nn.Conv3d)]
    norms = [m for m in enc.stem if isinstance(m, nn.BatchNorm3d)]
    for conv, bn, stride in zip(convs, norms, [(1, 2, 2), (2, 2, 2)]):
        y = F.conv3d(x, conv.weight, None, stride=stride, padding=1)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        y = (y - bn.running_mean[:, None, None, None]) * scale[:, None, None, None] + bn.bias[:, None, None, None]
        x = F.gelu(y)
    assert x.shape == (2, 6, 2, 8, 8)
    # what the blocks leave of the (2, 8, 8) tubelet: a (1, 2, 2) convolution to the width
    assert enc.patch_embed.kernel_size == (1, 2, 2) and enc.patch_embed.stride == (1, 2, 2)
    patches = F.conv3d(x, enc.patch_embed.weight, enc.patch_embed.bias, stride=(1, 2, 2))
    expected = patches.permute(0, 2, 3, 4, 1).flatten(2, 3) + enc.pos_embed[1:]
    assert grid == (4, 4) and tokens.shape == (2, 2, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = enc(torch.randn(1, 8, 3, 32, 32))  # another frame count than configured
    assert out.num_frames == 4 and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("bad", [(), (4, 0), (4, -2), [True], 2.5, -1])
def test_conv_stem_rejects_bad_channel_lists(bad):
    with pytest.raises(ValueError, match="conv_stem"):
        VideoEncoderConfig(**SMALL, num_frames=4, conv_stem=bad)


def test_inflation_refuses_a_video_stem_when_the_image_encoder_has_none():
    import ernie_vl
    from ernie_vl.inflate import inflate_video_from_image

    model = ernie_vl.create_model("tiny", class_names=["a", "b"], image_encoder={"conv_stem": 0},
                                  video_encoder={"conv_stem": [8, 16, 16]})
    assert model.video_encoder.stem is not None
    with pytest.raises(ValueError, match=r"conv_stem=ConvStemConfig\(channels=\(8, 16, 16\).*cannot be inflated"):
        inflate_video_from_image(model)
