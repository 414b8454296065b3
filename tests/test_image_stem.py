"""The image encoder's convolutional tokenizer (``ImageEncoderConfig.conv_stem``) and image -> video
inflation through it."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ernie_vl
from encoders.convert import video_encoder_from_image_encoder
from encoders.video_stem import ConvStemConfig, spatial_strides
from encoders.vit import ImageEncoder, ImageEncoderConfig

SMALL = dict(image_size=32, patch_size=4, width=32, depth=2, num_heads=2, mlp_ratio=2.0)
STEM = [8, 12, 16]


def randomise_batch_norms(module: nn.Module) -> None:
    """Non-trivial running statistics and affine terms, so that copying them is visible in the numbers."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def stem_model(video: dict | None = None, **image):
    """``tiny`` with a 3-block image tokenizer (its video encoder changed by ``video``), two classes."""
    return ernie_vl.create_model("tiny", class_names=["a", "b"], image_encoder={"conv_stem": [16, 32, 64], **image},
                                 video_encoder=video or {})


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("bad, match", [
    ({"channels": [8], "frame_diff": True}, r"frame_diff=True"),
    ({"channels": [8], "time_kernel": 1}, r"time_kernel=1"),
    (16, r"conv_stem=16.*single int"),
    ((), r"conv_stem"), ((4, 0), r"conv_stem"), ([True], r"conv_stem"), (2.5, r"conv_stem"), (-1, r"conv_stem"),
    ({"channels": [8], "stride": 2}, r"unknown key\(s\) \['stride'\]"),
    ({"channels": []}, r"no stem"),
])
def test_image_conv_stem_rejects_what_an_image_cannot_have(bad, match):
    with pytest.raises(ValueError, match=match):
        ImageEncoderConfig(**SMALL, conv_stem=bad)


def test_image_conv_stem_forms_parse_to_one_config():
    for given in ([8, 16], (8, 16), {"channels": [8, 16]}, ConvStemConfig((8, 16))):
        assert ImageEncoderConfig(**SMALL, conv_stem=given).conv_stem == ConvStemConfig((8, 16))
    assert ImageEncoderConfig(**SMALL).conv_stem == 0
    cfg = ernie_vl.ErnieVLConfig.from_dict({"image_encoder": {**SMALL, "conv_stem": {"channels": [8, 16]}}})
    assert cfg.image_encoder.conv_stem == ConvStemConfig((8, 16))


# --------------------------------------------------------------------------- the default is unchanged


def test_default_encoder_is_the_linear_patch_embedding_bit_for_bit():
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(**SMALL, head_gating=True, local_layers=1, window_size=3))
    # the parameters this seed gave before conv_stem existed (same modules, same random draws, same order)
    assert state_digest(enc) == "dc4444daab25042b"
    assert enc.stem is None and not any(k.startswith("stem.") for k in enc.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, grid = enc.embed_patches(x)
        want = F.conv2d(x, enc.patch_embed.weight, enc.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    assert grid == (8, 8) and torch.equal(tokens, want + enc.pos_embed[1:])


def test_tiny_and_ernie45_tiny_have_the_image_tokenizer_and_the_other_presets_the_linear_embedding():
    from ernie_vl.presets import load_config

    for name in ernie_vl.list_models():
        want = ConvStemConfig((16, 32, 64)) if name in ("tiny", "ernie45-tiny") else 0
        assert load_config(name).image_encoder.conv_stem == want, name


@pytest.mark.parametrize("preset", ["test", "tiny", "ernie45-tiny"])
def test_checkpoint_without_the_key_loads_with_no_stem_and_the_same_numbers(tmp_path, preset):
    """A checkpoint saved before the keys existed (no conv_stem in its config.json, image or video) loads
    stem-less with its numbers, whatever the preset says now (tiny's and ernie45-tiny's have stems since)."""
    torch.manual_seed(0)
    model = ernie_vl.create_model(preset, class_names=["a", "b"], image_encoder={"conv_stem": 0},
                                  video_encoder={"conv_stem": 0}).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["name"] == preset
    assert config["image_encoder"].pop("conv_stem") == 0 and config["video_encoder"].pop("conv_stem") == 0
    (tmp_path / "config.json").write_text(json.dumps(config))  # as written before the keys existed
    loaded = ernie_vl.ErnieVL.from_pretrained(tmp_path).eval()
    assert loaded.cfg.image_encoder.conv_stem == 0 and loaded.image_encoder.stem is None
    assert loaded.cfg.video_encoder.conv_stem == 0 and loaded.video_encoder.stem is None
    images = torch.rand(2, 3, 32, 32)
    clips = torch.rand(2, model.cfg.video_encoder.num_frames, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_video(clips), model.encode_video(clips))
        assert torch.equal(loaded.classify_video(clips), model.classify_video(clips))


def test_tiny_builds_its_image_tokenizer():
    new = ernie_vl.create_model("tiny")
    assert [m.out_channels for m in new.image_encoder.stem if isinstance(m, nn.Conv2d)] == [16, 32, 64]


# --------------------------------------------------------------------------- the stem path


def reference_stem(enc: ImageEncoder, x: torch.Tensor, strides) -> torch.Tensor:
    """The tokenizer in eval mode, computed by hand: conv, batch norm from its running statistics, GELU."""
    convs = [m for m in enc.stem if isinstance(m, nn.Conv2d)]
    norms = [m for m in enc.stem if isinstance(m, nn.BatchNorm2d)]
    for conv, bn, stride in zip(convs, norms, strides):
        y = F.conv2d(x, conv.weight, None, stride=stride, padding=1)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        x = F.gelu((y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None])
    return x


@pytest.mark.parametrize("patch, channels, strides, left, grid", [
    (4, (8, 12, 16), [(2, 2), (2, 2), (1, 1)], (1, 1), (8, 8)),  # tiny's geometry: 8x8 tokens as without a stem
    (8, (8, 12), [(2, 2), (2, 2)], (2, 2), (4, 4)),  # a 2x2 patch convolution is left
    ((4, 8), (8,), [(2, 2)], (2, 4), (8, 4)),
])
def test_stem_path_equals_its_blocks_computed_by_hand(patch, channels, strides, left, grid):
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(**{**SMALL, "patch_size": patch}, conv_stem=list(channels)))
    assert spatial_strides(len(channels), enc.cfg.patch_size) == strides
    assert enc.patch_embed.kernel_size == left and enc.patch_embed.stride == left
    assert enc.patch_embed.in_channels == channels[-1]
    randomise_batch_norms(enc)
    enc.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, got_grid = enc.embed_patches(x)
        feats = reference_stem(enc, x, strides)
        want = F.conv2d(feats, enc.patch_embed.weight, enc.patch_embed.bias, stride=left).flatten(2).transpose(1, 2)
        out = enc(x)
    assert got_grid == grid and out.grid == grid
    torch.testing.assert_close(tokens, want + enc.pos_embed[1:], rtol=1e-5, atol=1e-5)
    assert out.tokens.shape == (2, 1 + grid[0] * grid[1], 32)


def test_stem_convolutions_keep_pytorchs_init_and_train_their_batch_norms():
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(**SMALL, conv_stem=STEM))
    first = enc.stem[0].weight
    bound = 1 / (first[0].numel()) ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(first.detach().abs().max()) <= bound and float(first.detach().std()) > 0.5 * bound / 3 ** 0.5
    assert float(enc.patch_embed.weight.detach().std()) < 0.03  # the ViT's trunc-normal(0.02)
    enc.train()
    out = enc(torch.randn(4, 3, 32, 32) * 3 + 1)
    out.pooled.square().mean().backward()
    assert enc.stem[1].num_batches_tracked.item() == 1 and float(enc.stem[1].running_mean.abs().max()) > 0
    assert enc.stem[0].weight.grad is not None and float(enc.stem[0].weight.grad.abs().max()) > 0


def test_stem_works_with_gating_windows_prefix_only_pooling_and_other_sizes():
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(**SMALL, conv_stem=STEM, head_gating=True, local_layers=1, window_size=3,
                                          embed_dim=24)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        torch.testing.assert_close(enc.encode(x), out.pooled, rtol=1e-5, atol=1e-6)  # prefix_only path
        wide = enc(torch.randn(2, 3, 32, 48))  # positions resampled to the 8x12 grid
    assert out.active_head_ratio.shape == (2,) and bool((out.active_head_ratio > 0).all())
    assert wide.grid == (8, 12) and torch.isfinite(wide.pooled).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 30, 30))
    avg = ImageEncoder(ImageEncoderConfig(**SMALL, conv_stem=STEM, pool="avg")).eval()
    with torch.no_grad():
        out = avg(x)
    torch.testing.assert_close(out.pooled, out.tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-6)


def test_save_pretrained_round_trip_keeps_the_stem(tmp_path):
    torch.manual_seed(0)
    model = stem_model()
    randomise_batch_norms(model.image_encoder)
    model.eval().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["image_encoder"]["conv_stem"]
    assert saved == {"channels": [16, 32, 64], "frame_diff": False, "time_kernel": 3}
    loaded = ernie_vl.ErnieVL.from_pretrained(tmp_path).eval()
    assert loaded.cfg.image_encoder == model.cfg.image_encoder
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.image_encoder.stem[1].running_var, model.image_encoder.stem[1].running_var)


def test_int8_model_keeps_the_stem_float_and_stays_close(tmp_path):
    from ernie_vl.int8_engines import available_int8_kernels, set_int8_kernel
    from ernie_vl.quantize import Int8PatchEmbed, quantize_int8

    if not available_int8_kernels():
        pytest.skip("this PyTorch build has no int8 GEMM engine")
    previous = set_int8_kernel(available_int8_kernels()[-1])  # one engine: no per-shape timing probe
    try:
        check_int8_stem_model(quantize_int8, Int8PatchEmbed, tmp_path)
    finally:
        set_int8_kernel(previous)


def check_int8_stem_model(quantize_int8, Int8PatchEmbed, folder) -> None:
    torch.manual_seed(0)
    model = stem_model().eval()
    randomise_batch_norms(model.image_encoder)
    q = quantize_int8(model)
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.GELU) for m in q.image_encoder.stem)  # float convolutions
    assert isinstance(q.image_encoder.patch_embed, Int8PatchEmbed)  # the 1x1 patch embedding after it is int8
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        cos = F.cosine_similarity(q.encode_image(images), model.encode_image(images)).min()
    assert cos > 0.98, f"int8 vs float cosine {cos:.4f}"
    q.save_pretrained(folder)  # the int8 checkpoint rebuilds the same structure, stem included
    loaded = ernie_vl.ErnieVL.from_pretrained(folder).eval()
    assert isinstance(loaded.image_encoder.patch_embed, Int8PatchEmbed)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), q.encode_image(images))


def test_feature_kinds_read_the_stem_encoder():
    from ernie_vl.app.image_features import FEATURE_KINDS, ImageFeatures

    torch.manual_seed(0)
    model = stem_model().eval()
    images = torch.randn(3, 3, 32, 32)
    width, backbone = model.cfg.image_encoder.width, model.cfg.backbone
    dims = {"embedding": model.cfg.head.embed_dim, "pooled": backbone.width, "tokens": width,
            "layers": width + (1 + backbone.depth) * backbone.width}
    with torch.no_grad():
        for kind in FEATURE_KINDS:
            feats = ImageFeatures(model, kind).encode_image(images)
            assert feats.shape == (3, dims[kind]) and torch.isfinite(feats).all(), kind
        tokens = ImageFeatures(model, "tokens").encode_image(images)
        torch.testing.assert_close(tokens, model.image_encoder(images).patch_tokens.mean(1))


# --------------------------------------------------------------------------- inflation through the stem


@pytest.mark.parametrize("diff_init", ["zero", "pixels"])
@pytest.mark.parametrize("frame_diff", [False, True])
@pytest.mark.parametrize("gating", [False, True])
def test_inflated_model_embeds_a_still_clip_as_its_frame(frame_diff, gating, diff_init):
    from ernie_vl.inflate import inflate_video_from_image

    torch.manual_seed(0)
    video = {"conv_stem": {"channels": [8, 16], "frame_diff": frame_diff}, "head_gating": gating}
    model = stem_model(video, head_gating=gating).eval()
    randomise_batch_norms(model.image_encoder)
    new = inflate_video_from_image(model, diff_init=diff_init).eval()
    stem = new.cfg.video_encoder.conv_stem  # the image's channels, the video's frame differences
    assert stem == ConvStemConfig((16, 32, 64), frame_diff=frame_diff, time_kernel=3)
    assert new.cfg.video_encoder.patch_size == (4, 4) and new.cfg.video_encoder.tubelet_size == 4
    first = new.video_encoder.stem[0].weight  # (16, 3 or 6, 3, 3, 3)
    assert first.shape[1] == (6 if frame_diff else 3)
    assert torch.equal(first[:, :3, 1], model.image_encoder.stem[0].weight)
    assert torch.count_nonzero(first[:, :, [0, 2]]) == 0
    if frame_diff:  # the differences' weights: zero, or the pixels' (TSN's start of the RGB-difference stream)
        assert torch.equal(first[:, 3:], first[:, :3]) if diff_init == "pixels" else torch.count_nonzero(first[:, 3:]) == 0
    assert torch.equal(new.video_encoder.stem[1].running_var, model.image_encoder.stem[1].running_var)
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        still = frames[:, None].expand(2, 8, 3, 32, 32).contiguous()
        torch.testing.assert_close(new.encode_video(still), new.encode_image(frames), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new.encode_image(frames), model.encode_image(frames), rtol=0, atol=0)
        if frame_diff and diff_init == "pixels":  # a moving clip's differences now reach the tokens
            moving = torch.randn(2, 8, 3, 32, 32)
            zero = inflate_video_from_image(model, diff_init="zero").eval()
            assert not torch.allclose(new.encode_video(moving), zero.encode_video(moving), atol=1e-3)


def test_inflation_names_an_unknown_difference_initialisation():
    from encoders.convert import inflate_kernel
    from ernie_vl.inflate import inflate_video_from_image

    model = stem_model({"conv_stem": {"channels": [8], "frame_diff": True}})
    with pytest.raises(ValueError, match="'random'.*'zero', 'pixels'"):
        inflate_video_from_image(model, diff_init="random")
    with pytest.raises(ValueError, match="twice the kernel's 3 input channels"):
        inflate_kernel(torch.ones(4, 3, 3, 3), torch.Size((4, 5, 3, 3, 3)), "centre", "pixels")
    mean = inflate_kernel(torch.ones(4, 3, 3, 3), torch.Size((4, 6, 2, 3, 3)), "mean", "pixels")
    assert torch.equal(mean, torch.full((4, 6, 2, 3, 3), 0.5))  # kernel / kt in each slice, for both halves


@pytest.mark.parametrize("blocks, tubelet, step", [
    ((8, 12, 16), 4, 4),  # tiny's geometry: the stem's time strides consume the tubelet; frame t*4 alone
    ((8,), 4, 2),  # one block: time stride 2, then the mean over 2 steps: frames t*4 and t*4 + 2
    ((8, 12, 16), 1, 1),  # no time strides: every frame is its own time step
])
def test_inflated_stem_tokens_of_a_moving_clip_are_image_tokens_of_strided_frames(blocks, tubelet, step):
    torch.manual_seed(0)
    image = ImageEncoder(ImageEncoderConfig(**SMALL, conv_stem=list(blocks)))
    randomise_batch_norms(image)
    image.eval()
    video = video_encoder_from_image_encoder(image, 8, "divided", "per_frame", tubelet, frame_diff=True,
                                             diff_init="zero").eval()  # the frame-mean equality needs zero
    clips = torch.randn(2, 8, 3, 32, 32)  # every frame different
    with torch.no_grad():
        tokens, grid = video.embed_clip(clips)
        per_frame = torch.stack([image.embed_patches(clips[:, t])[0] for t in range(8)], 1)
        want = torch.stack([per_frame[:, t * tubelet:(t + 1) * tubelet:step].mean(1) for t in range(8 // tubelet)], 1)
        torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-5)
        # without gating, per_frame class tokens: the image encoder's mean over those frame averages
        if step == tubelet:
            pooled = torch.stack([image(clips[:, t]).pooled for t in range(0, 8, tubelet)], 1).mean(1)
            torch.testing.assert_close(video(clips).pooled, pooled, rtol=1e-4, atol=1e-5)
    assert grid == (8, 8)


def test_what_can_be_inflated():
    from ernie_vl.inflate import inflate_video_from_image, inflation_problem

    def cfg(image, video):
        return ernie_vl.ErnieVLConfig.from_dict({"image_encoder": {**SMALL, "conv_stem": image},
                                                 "video_encoder": {**SMALL, "conv_stem": video}})

    assert inflation_problem(cfg([8], {"channels": [4, 8], "frame_diff": True})) is None
    assert inflation_problem(cfg([8], 16)) is None  # the image's tokenizer replaces the one-conv stem
    assert inflation_problem(cfg(0, 0)) is None
    assert inflation_problem(cfg(0, {"channels": [], "frame_diff": True})) is None  # linear, zero diff weights
    problem = inflation_problem(cfg(0, [4, 8]))
    assert "linear patch embedding cannot be inflated" in problem and "image_encoder.conv_stem" in problem
    # frame differences over the linear embedding: the difference channels start at the pixels' (or at zero)
    torch.manual_seed(0)
    assert inflation_problem(ernie_vl.load_config("tiny")) is None  # tiny's image tokenizer inflates into its video one
    model = ernie_vl.create_model("tiny", class_names=["a", "b"], image_encoder={"conv_stem": 0},
                                  video_encoder={"conv_stem": {"channels": [], "frame_diff": True}})
    new = inflate_video_from_image(model).eval()
    embed = new.video_encoder.patch_embed.weight
    assert embed.shape == (96, 6, 4, 4, 4) and torch.equal(embed[:, 3:], embed[:, :3])
    zero = inflate_video_from_image(model, diff_init="zero").video_encoder.patch_embed.weight
    assert torch.equal(zero[:, :3], embed[:, :3]) and torch.count_nonzero(zero[:, 3:]) == 0
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        still = frames[:, None].expand(2, 8, 3, 32, 32).contiguous()
        torch.testing.assert_close(new.encode_video(still), new.encode_image(frames), rtol=1e-4, atol=1e-5)
