"""The video encoder's convolutional stem with frame differences (``conv_stem={"channels": ..., "frame_diff":
True}``): parity against a by-hand computation, config forms and their round trip through checkpoints,
old checkpoints, inflation refusal and bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoders.video_stem import ConvStemConfig, frame_differences
from encoders.video_vit import VideoEncoder, VideoEncoderConfig

SMALL = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0)


def test_frame_differences_are_the_change_since_the_previous_frame():
    x = torch.arange(2 * 1 * 4 * 1 * 1, dtype=torch.float32).reshape(2, 1, 4, 1, 1) ** 2  # (B, C, T, H, W)
    out = frame_differences(x)
    assert out.shape == (2, 2, 4, 1, 1)
    torch.testing.assert_close(out[:, :1], x)
    assert out[0, 1, :, 0, 0].tolist() == [0.0, 1.0, 3.0, 5.0]  # 0, 1, 4, 9 -> 0, 1-0, 4-1, 9-4
    assert out[1, 1, :, 0, 0].tolist() == [0.0, 9.0, 11.0, 13.0]  # 16, 25, 36, 49


def _randomise_batch_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)


def test_frame_diff_tokenizer_equals_its_blocks_computed_by_hand():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=2,
                                          conv_stem={"channels": [5, 6], "frame_diff": True}))
    assert enc.cfg.conv_stem == ConvStemConfig(channels=(5, 6), frame_diff=True)
    convs = [m for m in enc.stem if isinstance(m, nn.Conv3d)]
    norms = [m for m in enc.stem if isinstance(m, nn.BatchNorm3d)]
    assert convs[0].in_channels == 6  # the pixels and their differences
    _randomise_batch_norms(enc.stem)
    enc.eval()
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = enc.embed_clip(clips)
    frames = clips.transpose(1, 2)  # (B, 3, T, H, W)
    diffs = torch.zeros_like(frames)
    for t in range(1, 4):
        diffs[:, :, t] = frames[:, :, t] - frames[:, :, t - 1]
    x = torch.cat([frames, diffs], dim=1)
    for conv, bn, stride in zip(convs, norms, [(1, 2, 2), (2, 2, 2)]):
        y = F.conv3d(x, conv.weight, None, stride=stride, padding=1)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        y = (y - bn.running_mean[:, None, None, None]) * scale[:, None, None, None] + bn.bias[:, None, None, None]
        x = F.gelu(y)
    patches = F.conv3d(x, enc.patch_embed.weight, enc.patch_embed.bias, stride=(1, 2, 2))
    expected = patches.permute(0, 2, 3, 4, 1).flatten(2, 3) + enc.pos_embed[1:]
    assert grid == (4, 4) and tokens.shape == (2, 2, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_frame_diff_without_blocks_is_a_linear_tubelet_over_pixels_and_differences():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=2,
                                          conv_stem={"channels": [], "frame_diff": True}))
    assert enc.stem is None and enc.patch_embed.in_channels == 6 and enc.patch_embed.kernel_size == (2, 8, 8)
    clips = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = enc.embed_clip(clips)
    frames = clips.transpose(1, 2)
    x = torch.cat([frames, torch.cat([torch.zeros_like(frames[:, :, :1]), frames.diff(dim=2)], dim=2)], dim=1)
    patches = F.conv3d(x, enc.patch_embed.weight, enc.patch_embed.bias, stride=(2, 8, 8))
    torch.testing.assert_close(tokens, patches.permute(0, 2, 3, 4, 1).flatten(2, 3) + enc.pos_embed[1:],
                               rtol=1e-5, atol=1e-5)


def test_a_still_clip_gives_zero_differences_so_only_the_pixels_count():
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=4,
                                          conv_stem={"channels": [4, 8], "frame_diff": True})).eval()
    frame = torch.randn(1, 1, 3, 32, 32)
    still = frame.expand(1, 4, 3, 32, 32).contiguous()
    with torch.no_grad():
        first = enc.stem[0](frame_differences(still.transpose(1, 2)))
        weight = enc.stem[0].weight.clone()
        weight[:, 3:] = 0  # the difference channels' weights do not matter on a still clip
        pixels_only = F.conv3d(still.transpose(1, 2).repeat(1, 2, 1, 1, 1), weight, None,
                               stride=enc.stem[0].stride, padding=1)
    torch.testing.assert_close(first, pixels_only, rtol=1e-5, atol=1e-5)


def test_time_kernel_one_tokenizes_each_frame_from_itself_alone():
    """``time_kernel=1`` without frame differences: 1x3x3 blocks, so with 1-frame tubelets a frame's tokens are
    the tokens of that frame embedded alone, and a space-only encoder's pooled output ignores the frame order."""
    torch.manual_seed(0)
    stem = {"channels": [4, 8], "frame_diff": False, "time_kernel": 1}
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=1, attention="space_only",
                                          conv_stem=stem)).eval()
    assert [m.kernel_size for m in enc.stem if isinstance(m, nn.Conv3d)] == [(1, 3, 3)] * 2
    _randomise_batch_norms(enc.stem)
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = enc.embed_clip(clips)
        for t in range(4):
            alone, _ = enc.embed_clip(clips[:, t:t + 1])
            torch.testing.assert_close(tokens[:, t], alone[:, 0], rtol=1e-5, atol=1e-5)
        order = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(enc(clips[:, order]).pooled, enc(clips).pooled, rtol=1e-5, atol=1e-5)
        # the default 3x3x3 blocks do mix neighbouring frames: the same check fails
        mixed = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=1, attention="space_only",
                                                conv_stem=dict(stem, time_kernel=3))).eval()
        together, _ = mixed.embed_clip(clips)
        alone, _ = mixed.embed_clip(clips[:, 1:2])
        assert (together[:, 1] - alone[:, 0]).abs().max() > 1e-3


def test_config_forms_are_one_concept():
    as_list = VideoEncoderConfig(**SMALL, num_frames=4, conv_stem=[4, 8])
    as_dict = VideoEncoderConfig(**SMALL, num_frames=4, conv_stem={"channels": [4, 8]})
    as_cfg = VideoEncoderConfig(**SMALL, num_frames=4, conv_stem=ConvStemConfig((4, 8), False))
    assert as_list.conv_stem == as_dict.conv_stem == as_cfg.conv_stem == ConvStemConfig((4, 8), False)
    assert VideoEncoderConfig(**SMALL, num_frames=4, conv_stem=24).conv_stem == 24  # the one-conv stem stays


@pytest.mark.parametrize("bad, match", [
    ({"channels": [4], "diff": True}, r"unknown key\(s\) \['diff'\]; valid keys: \['channels', 'frame_diff', 'time_kernel'\]"),
    ({"channels": [4], "time_kernel": 2}, r"time_kernel must be an odd int >= 1 \(1, 3, 5, ...\), got 2"),
    ({"channels": [4], "time_kernel": 0}, "time_kernel must be an odd int >= 1"),
    ({"channels": [4], "time_kernel": True}, "time_kernel must be an odd int >= 1"),
    ({"channels": [4], "frame_diff": "yes"}, "frame_diff must be a bool"),
    ({"channels": []}, "no stem; use conv_stem=0"),
    ({"channels": [4, 0]}, "positive ints"),
    ("16,32", "conv_stem must be an int >= 0"),
])
def test_bad_stem_configs_name_the_value_and_what_is_valid(bad, match):
    with pytest.raises(ValueError, match=match):
        VideoEncoderConfig(**SMALL, num_frames=4, conv_stem=bad)


def test_model_config_round_trips_and_old_list_checkpoints_load(tmp_path):
    import ernie_vl
    from ernie_vl.config import ErnieVLConfig

    torch.manual_seed(0)
    model = ernie_vl.create_model("test", class_names=["a", "b"], video_encoder={"conv_stem": [4, 8]}).eval()
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["video_encoder"]["conv_stem"] == {"channels": [4, 8], "frame_diff": False, "time_kernel": 3}
    assert ErnieVLConfig.from_dict(saved) == model.cfg
    # a checkpoint written before the dict form spelt the tokenizer as a list: same keys, same numbers
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((tmp_path / "new" / "model.safetensors").read_bytes())
    saved["video_encoder"]["conv_stem"] = [4, 8]
    (old / "config.json").write_text(json.dumps(saved))
    loaded = ernie_vl.ErnieVL.from_pretrained(old).eval()
    clips = torch.rand(2, 8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(clips), model.encode_video(clips), rtol=0, atol=0)
    # and one from before any stem existed has no conv_stem key at all: no stem
    del saved["video_encoder"]["conv_stem"]
    assert ErnieVLConfig.from_dict(saved).video_encoder.conv_stem == 0


def test_tiny_defaults_to_the_frame_diff_tokenizer_and_old_tiny_checkpoints_load_as_saved(tmp_path):
    """A checkpoint carries its own config: one saved when tiny had no stem loads stem-less, with its
    numbers, whatever the preset says now (its config.json names "tiny" and has no conv_stem key)."""
    import ernie_vl

    new = ernie_vl.create_model("tiny", class_names=["a", "b"])
    assert new.cfg.video_encoder.conv_stem == ConvStemConfig((16, 32, 64), True)
    assert [m.out_channels for m in new.video_encoder.stem if isinstance(m, nn.Conv3d)] == [16, 32, 64]
    torch.manual_seed(0)
    old = ernie_vl.create_model("tiny", class_names=["a", "b"], video_encoder={"conv_stem": 0}).eval()
    assert old.video_encoder.stem is None
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["name"] == "tiny"
    del saved["video_encoder"]["conv_stem"]  # as written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = ernie_vl.ErnieVL.from_pretrained(tmp_path).eval()
    assert loaded.cfg.video_encoder.conv_stem == 0 and loaded.video_encoder.stem is None
    assert loaded.video_encoder.patch_embed.weight.shape == (96, 3, 4, 8, 8)  # pixels only, one tubelet conv
    clips = torch.rand(2, 8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(clips), old.encode_video(clips), rtol=0, atol=0)
        torch.testing.assert_close(loaded.classify_video(clips), old.classify_video(clips), rtol=0, atol=0)


def test_frame_diff_checkpoint_round_trips(tmp_path):
    import ernie_vl

    torch.manual_seed(0)
    stem = {"channels": [4, 8], "frame_diff": True}
    model = ernie_vl.create_model("test", class_names=["a", "b"], video_encoder={"conv_stem": stem}).eval()
    model.save_pretrained(tmp_path)
    loaded = ernie_vl.ErnieVL.from_pretrained(tmp_path).eval()
    assert loaded.cfg.video_encoder.conv_stem == ConvStemConfig((4, 8), True)
    clips = torch.rand(2, 8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(clips), model.encode_video(clips), rtol=0, atol=0)


def test_inflation_refuses_a_frame_diff_tokenizer_without_an_image_stem_but_not_bare_frame_differences():
    """Blocks cannot come from a linear patch embedding; frame differences alone feed it, through the pixels'
    weights by default or zero ones (tests/test_image_stem.py checks the numbers)."""
    import ernie_vl
    from ernie_vl.inflate import inflate_video_from_image

    model = ernie_vl.create_model("test", class_names=["a", "b"],
                                  video_encoder={"conv_stem": {"channels": [4], "frame_diff": True}})
    with pytest.raises(ValueError, match=r"frame_diff=True.*cannot be inflated.*image_encoder.conv_stem"):
        inflate_video_from_image(model)
    model = ernie_vl.create_model("test", class_names=["a", "b"],
                                  video_encoder={"conv_stem": {"channels": [], "frame_diff": True}})
    inflated = inflate_video_from_image(model, diff_init="zero").video_encoder
    assert inflated.cfg.conv_stem == ConvStemConfig((), frame_diff=True)
    assert torch.count_nonzero(inflated.patch_embed.weight[:, 3:]) == 0


def test_few_shot_bench_holds_the_encoder_to_its_goal_on_two_seeds():
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
    import few_shot_video as bench

    name, clips, goal = bench.ENCODER_GOAL
    assert name == "vit_ref_tokenizer_diff" and clips == 40 and goal == 0.93
    assert bench.REFERENCES[name] == {"conv_stem": {"channels": [16, 32, 64], "frame_diff": True}}
    assert bench.REFERENCES["vit_ref"] == {"conv_stem": 0}  # the plain encoder, whatever tiny's default

    def verdict(*top1s):
        rows = [{"clips": 40, "variant": name, "seed": s, "top1": t, "steps": 900} for s, t in enumerate(top1s)]
        (v,) = [x for x in bench.verdicts(rows) if x.what.startswith("tiny's bare video encoder with frame-diff")]
        return v

    assert verdict(0.95).met is False and "(one seed only)" in verdict(0.95).measured
    assert verdict(0.95, 0.93).met is True
    assert verdict(0.95, 0.92).met is False
    assert verdict(0.95, 0.93).measured == "seed 0: 0.950 (900 steps), seed 1: 0.930 (900 steps)"


def test_the_bench_row_trains_the_frame_diff_encoder_with_its_loop_settings(tmp_path):
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
    import few_shot_video as bench
    from _motion_clips import CLASSES, make_clips

    data = make_clips(tmp_path / "clips", 2, val_per_class=1)
    row = bench.run_reference(2, "vit_ref_tokenizer_diff", 0, data, SimpleNamespace(steps=2))
    assert row["steps"] == 2 and row["variant"] == "vit_ref_tokenizer_diff"
    assert 0.0 <= row["top1"] <= 1.0 and row["top1"] * len(CLASSES) == round(row["top1"] * len(CLASSES))
    assert "'frame_diff': True" in row["setup"]["reference"] and "weight decay 0.05" in row["setup"]["reference"]
    assert row["video_encoder"]["conv_stem"] == {"channels": [16, 32, 64], "frame_diff": True, "time_kernel": 3}
    assert not bench.is_stale(row)


@pytest.mark.parametrize("stem, tubelet, pointwise", [({"channels": [4, 6, 8], "frame_diff": True}, 4, True),
                                                      ({"channels": [4, 6], "frame_diff": True}, 2, False)])
def test_a_pointwise_patch_embedding_is_one_matrix_product_with_the_convolutions_numbers(stem, tubelet, pointwise):
    """Where the tokenizer's strides cover the whole patch and tubelet (tiny's three blocks), the patch embedding
    is a 1x1x1 convolution, computed as a matrix product over the channels-last features: the convolution's
    values and gradients, weight and bias included; other patch embeddings stay convolutions."""
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, num_frames=4, tubelet_size=tubelet, conv_stem=stem))
    nn.init.normal_(enc.patch_embed.bias)
    assert (enc.patch_embed.kernel_size == (1, 1, 1)) is pointwise
    feats = torch.randn(3, enc.patch_embed.in_channels, 2 if pointwise else 4, 4 if pointwise else 8,
                        4 if pointwise else 8).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ours = enc.embed_features(feats)
    grad = torch.randn_like(ours)
    (ours * grad).sum().backward()
    got = [feats.grad.clone(), enc.patch_embed.weight.grad.clone(), enc.patch_embed.bias.grad.clone()]
    feats.grad = enc.patch_embed.weight.grad = enc.patch_embed.bias.grad = None
    conv = F.conv3d(feats, enc.patch_embed.weight, enc.patch_embed.bias, stride=enc.patch_embed.stride)
    want_y = conv.permute(0, 2, 3, 4, 1)
    (want_y * grad).sum().backward()
    assert ours.shape == want_y.shape == ((3, 2, 4, 4, 32) if pointwise else (3, 4, 4, 4, 32))
    torch.testing.assert_close(ours, want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, [feats.grad, enc.patch_embed.weight.grad, enc.patch_embed.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
