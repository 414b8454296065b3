import dataclasses

import pytest
import torch

from encoders import ImageEncoder, VideoEncoder, VideoEncoderConfig, video_encoder_from_image_encoder
from tests._encoders_helpers import params_without_grad, randomize_, tiny_image_cfg, tiny_video_cfg


@pytest.mark.parametrize("attention", ["divided", "joint", "space_only"])
@pytest.mark.parametrize("cls_mode", ["shared", "per_frame"])
def test_shapes_per_mode(attention, cls_mode):
    enc = VideoEncoder(tiny_video_cfg(attention=attention, cls_mode=cls_mode, embed_dim=8))
    out = enc(torch.randn(2, 4, 3, 32, 32))
    prefix = 1 if cls_mode == "shared" else 4
    assert out.tokens.shape == (2, prefix + 16 * 4, 32)
    assert out.pooled.shape == (2, 8) and out.num_frames == 4 and out.grid == (4, 4)
    assert out.num_prefix_tokens == prefix and out.patch_tokens.shape == (2, 64, 32)


def test_frames_and_size_come_from_the_input():
    enc = randomize_(VideoEncoder(tiny_video_cfg(num_frames=4)))
    out = enc(torch.randn(1, 6, 3, 40, 24))
    assert out.tokens.shape == (1, 1 + 5 * 3 * 6, 32) and out.num_frames == 6 and out.grid == (5, 3)
    assert torch.isfinite(out.tokens).all()


def test_temporal_embedding_resampling_values():
    from encoders.pos_embed import resample_temporal_embed

    time = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    torch.testing.assert_close(resample_temporal_embed(time, 2, "nearest"), torch.tensor([[0.0], [2.0]]))
    up = resample_temporal_embed(time, 8, "linear")
    assert up.shape == (8, 1) and up[0].item() == 0.0 and up[-1].item() == 3.0
    assert torch.all(up[1:] >= up[:-1])


def test_shared_cls_is_one_token_for_all_frames_and_patches_are_position_major():
    enc = randomize_(VideoEncoder(tiny_video_cfg(attention="space_only", cls_mode="shared")))
    clips = torch.randn(1, 4, 3, 32, 32)
    out = enc(clips)
    # space_only, no shared-cls coupling through patches: frame t's patches depend on frame t only
    clips2 = clips.clone()
    clips2[:, 2] = torch.randn(3, 32, 32)
    out2 = enc(clips2)
    patches = out.patch_tokens.reshape(1, 16, 4, 32)  # (h*w, t) order
    patches2 = out2.patch_tokens.reshape(1, 16, 4, 32)
    changed = (patches - patches2).abs().amax(dim=(0, 1, 3)) > 1e-6
    # the shared class token feeds every frame, so all frames move a little; frame 2 moves most
    assert changed[2] and (patches - patches2)[:, :, 2].abs().max() > (patches - patches2)[:, :, 0].abs().max()


def test_divided_temporal_branch_mixes_frames_only_at_the_same_position():
    enc = randomize_(VideoEncoder(tiny_video_cfg(attention="divided", cls_mode="per_frame", depth=1)))
    block = enc.blocks[0]
    x = torch.randn(1, 4, 17, 32)
    y = block.temporal(x)
    x2 = x.clone()
    x2[:, 0, 5] += torch.randn(32)  # frame 0, patch 4
    y2 = block.temporal(x2)
    diff = (y - y2).abs().amax(-1)[0]  # (T, 17)
    assert (diff[:, 5] > 1e-6).all()  # every frame at that position moved
    diff[:, 5] = 0
    assert diff.max() < 1e-6  # nothing else did


def test_inflated_per_frame_equals_image_encoder_per_frame():
    image = randomize_(ImageEncoder(tiny_image_cfg(local_layers=1, window_size=3)))
    video = video_encoder_from_image_encoder(image, num_frames=4, attention="divided", cls_mode="per_frame")
    clips = torch.randn(2, 4, 3, 32, 32)
    out = video(clips)
    per_frame = image(clips.flatten(0, 1))
    torch.testing.assert_close(out.pooled, per_frame.pooled.reshape(2, 4, -1).mean(1), atol=1e-5, rtol=0)
    frames = per_frame.tokens.reshape(2, 4, 17, 32)
    torch.testing.assert_close(out.tokens[:, :4], frames[:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.patch_tokens, frames[:, :, 1:].permute(0, 2, 1, 3).reshape(2, 64, 32), atol=1e-5, rtol=0
    )
    # the temporal branch was initialised from the spatial weights, with a zero output projection
    assert torch.equal(video.blocks[0].temporal_attn.qkv.weight, image.blocks[0].attn.qkv.weight)
    assert torch.count_nonzero(video.blocks[0].temporal_proj.weight) == 0


def test_inflation_with_space_only_and_other_frame_count():
    image = randomize_(ImageEncoder(tiny_image_cfg()))
    video = video_encoder_from_image_encoder(image, num_frames=8, attention="space_only", cls_mode="per_frame")
    clips = torch.randn(1, 3, 3, 32, 32)
    torch.testing.assert_close(video(clips).pooled, image(clips[0]).pooled.mean(0, keepdim=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_every_parameter_gets_a_gradient(attention):
    local = 1 if attention == "divided" else 0
    enc = VideoEncoder(tiny_video_cfg(attention=attention, head_gating=True, local_layers=local, window_size=3, embed_dim=8))
    randomize_(enc)
    out = enc(torch.randn(2, 3, 3, 32, 32))
    (out.pooled.square().sum() + out.tokens.square().mean()).backward()
    assert params_without_grad(enc) == []


def test_gating_reports_ratio_and_topk_path_matches_reference():
    enc = randomize_(VideoEncoder(tiny_video_cfg(head_gating=True, head_topk=2)), std=0.3)
    out = enc(torch.randn(2, 4, 3, 32, 32))
    torch.testing.assert_close(out.active_head_ratio, torch.full((2,), 0.5))
    # gates are per clip: every frame of a clip uses the same heads
    block = enc.blocks[0]
    h = block.norm1(torch.randn(2 * 4, 17, 32))
    gate = block.compute_gate(h, group=4)
    assert torch.equal(gate.keep.reshape(2, 4, 4), gate.keep.reshape(2, 4, 4)[:, :1].expand(2, 4, 4))


def test_fused_and_eager_video_agree():
    cfg = tiny_video_cfg(attention="divided")
    fused = randomize_(VideoEncoder(cfg))
    eager = VideoEncoder(dataclasses.replace(cfg, attn_impl="eager"))
    eager.load_state_dict(fused.state_dict())
    clips = torch.randn(1, 4, 3, 32, 32)
    torch.testing.assert_close(fused(clips).tokens, eager(clips).tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(attention="factorised"), "factorised"),
        (dict(cls_mode="both"), "both"),
        (dict(num_frames=0), "num_frames"),
        (dict(attention="joint", local_layers=1), "joint"),
        (dict(temporal_interp="cubic"), "cubic"),
    ],
)
def test_bad_video_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_video_cfg(**overrides)


@pytest.mark.parametrize(
    "x,err,match",
    [
        (torch.randn(4, 3, 32, 32), ValueError, r"\(B, T, 3, H, W\)"),
        (torch.randn(1, 4, 1, 32, 32), ValueError, "3 channels"),
        (torch.zeros(1, 4, 3, 32, 32, dtype=torch.int64), TypeError, "int64"),
    ],
)
def test_bad_clip_input(x, err, match):
    with pytest.raises(err, match=match):
        VideoEncoder(tiny_video_cfg())(x)


def test_video_encoder_needs_video_config():
    with pytest.raises(TypeError, match="VideoEncoderConfig"):
        VideoEncoder(tiny_image_cfg())
    assert isinstance(VideoEncoderConfig(**dataclasses.asdict(tiny_video_cfg())), VideoEncoderConfig)
