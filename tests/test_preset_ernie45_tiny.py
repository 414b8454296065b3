"""The ``ernie45-tiny`` preset: ERNIE 4.5 VL's layout in miniature, trained one step, saved, loaded."""
from __future__ import annotations

import torch

import ernie_vl
from ernie_vl.model import ErnieVLBatch
from ernie_vl.moe.balance import routers_with_bias, update_score_biases


def test_ernie45_tiny_has_groups_shared_experts_bias_and_the_resampler():
    cfg = ernie_vl.load_config("ernie45-tiny")
    moe = cfg.backbone.moe
    assert moe.routing == "groups" and moe.group_layout == ("text", "vision")
    assert moe.group_hidden[0] == 3 * moe.group_hidden[1]  # ERNIE 4.5 VL 28B-A3B: [1536, 512]
    assert moe.num_shared_experts >= 1 and moe.score_bias and moe.bias_gamma > 0
    assert cfg.image_projector.kind == cfg.video_projector.kind == "resampler_ernie45"


def test_ernie45_tiny_has_exactly_tinys_encoders_conv_tokenizers_included():
    """Against ``tiny`` it differs in the backbone and the aligners only (bench/train_synthetic's
    ``ernie45`` vs ``divided`` rows compare those alone)."""
    from encoders.video_stem import ConvStemConfig

    cfg, tiny = ernie_vl.load_config("ernie45-tiny"), ernie_vl.load_config("tiny")
    assert cfg.image_encoder == tiny.image_encoder and cfg.video_encoder == tiny.video_encoder
    assert cfg.image_encoder.conv_stem == ConvStemConfig((16, 32, 64))
    assert cfg.video_encoder.conv_stem == ConvStemConfig((16, 32, 64), frame_diff=True)
    torch.manual_seed(0)
    a, b = ernie_vl.create_model("ernie45-tiny").eval(), ernie_vl.create_model("tiny").eval()
    encoders = ("image_encoder.", "video_encoder.")
    shapes = {k: v.shape for k, v in a.state_dict().items() if k.startswith(encoders)}
    assert shapes == {k: v.shape for k, v in b.state_dict().items() if k.startswith(encoders)}
    assert any(k.startswith("video_encoder.stem.") for k in shapes)


def test_ernie45_tiny_video_path_inflates_from_its_image_tokenizer():
    """``--video-init image``: the image tokenizer inflates into the video one; the encoder embeds a still
    clip as its frame, and the resampler aligner of images becomes the clips' aligner. The model's embedding of
    a still clip is not its frame's (``ernie_vl.inflate`` says why), and the test shows the reason."""
    from ernie_vl.inflate import inflate_video_from_image, inflation_problem
    from ernie_vl.train.finetune import KEPT_STEM, video_start

    cfg = ernie_vl.load_config("ernie45-tiny")
    assert inflation_problem(cfg) is None
    # --video-init auto keeps a video conv stem, as for tiny
    assert video_start("auto", True, {"pairs"}, bool(cfg.video_encoder.conv_stem)) == KEPT_STEM
    torch.manual_seed(0)
    model = ernie_vl.create_model("ernie45-tiny", num_classes=3).eval()
    new = inflate_video_from_image(model).eval()
    assert new.cfg.video_encoder.conv_stem.channels == (16, 32, 64) and new.cfg.video_encoder.conv_stem.frame_diff
    assert new.cfg.video_projector == model.cfg.image_projector
    for key, value in model.image_projector.state_dict().items():
        assert torch.equal(new.video_projector.state_dict()[key], value), key
    frames = torch.rand(2, 3, 32, 32)
    still = frames[:, None].expand(2, 8, 3, 32, 32).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(new.video_encoder(still).pooled, new.image_encoder(frames).pooled,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new.encode_image(frames), model.encode_image(frames), rtol=0, atol=0)
        # the model level differs: the aligner merges the patches over pairs of time steps but keeps the clip's
        # two identical class tokens, which the backbone's attention then weighs twice where an image has one
        gap = (new.encode_video(still) - new.encode_image(frames)).abs().max()
        assert gap > 1e-3, gap
        aligner = new.video_projector.forward

        def one_class_token(tokens, num_prefix, **layout):
            out, prefix = aligner(tokens, num_prefix, **layout)
            return out[:, prefix - 1:], 1

        new.video_projector.forward = one_class_token  # one copy of the class token: the image's input again
        torch.testing.assert_close(new.encode_video(still), new.encode_image(frames), rtol=1e-4, atol=1e-5)


def test_ernie45_tiny_trains_a_step_moves_the_bias_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ernie_vl.create_model("ernie45-tiny", num_classes=3)
    routers = routers_with_bias(model)
    assert len(routers) == 4  # 2 MoE layers x (text, vision)
    texts = model.tokenizer(["a red square", "a blue circle"])
    batch = ErnieVLBatch(images=torch.randn(2, 3, 32, 32), texts=texts, videos=torch.randn(2, 8, 3, 32, 32),
                         video_labels=torch.tensor([0, 2]))
    out = model(batch)
    stats = out.routing[0]
    assert stats.tokens_per_expert.shape == (8,) and stats.expert_group.tolist() == [0] * 4 + [1] * 4
    assert float(stats.overlap_rate) == 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out.loss.backward()
    opt.step()
    assert all(int(r.load_count.sum()) > 0 for r in routers)
    assert update_score_biases(model) == 4
    assert all(float(r.score_bias.abs().sum()) > 0 for r in routers)
    model.eval()
    model.save_pretrained(str(tmp_path / "m"))
    again = ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "m"))
    for a, b in zip(routers, routers_with_bias(again)):
        assert torch.equal(a.score_bias, b.score_bias)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images))


def test_ernie45_tiny_quantizes_group_by_group():
    from ernie_vl.quantize import Int8MoEFeedForward

    torch.manual_seed(0)
    model = ernie_vl.create_model("ernie45-tiny").eval()
    int8 = ernie_vl.quantize_int8(model)
    layer = int8.backbone.blocks[0].mlp
    assert layer.config.routing == "groups" and all(isinstance(g, Int8MoEFeedForward) for g in layer.groups)
    # the conv tokenizers stay float (as on tiny); the resampler aligners' linear layers go int8
    for stem in (int8.image_encoder.stem, int8.video_encoder.stem):
        assert all(type(m) in (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                               torch.nn.GELU) for m in stem)
    for projector in (int8.image_projector, int8.video_projector):
        assert any(type(m).__name__ == "Int8Linear" for m in projector.modules())
        assert not any(type(m) is torch.nn.Linear for m in projector.modules())
    clips, images = torch.randn(2, 8, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_video(clips), int8.encode_video(clips))
        cos_image = torch.nn.functional.cosine_similarity(model.encode_image(images), int8.encode_image(images))
    assert float(cos.min()) > 0.99 and float(cos_image.min()) > 0.99


def test_ernie45_tiny_reports_aux_losses_per_group():
    torch.manual_seed(0)
    model = ernie_vl.create_model("ernie45-tiny", num_classes=3)
    batch = ErnieVLBatch(images=torch.randn(2, 3, 32, 32), texts=model.tokenizer(["a", "b"]))
    out = model(batch)
    assert {"load_balance/text", "load_balance/vision", "z_loss/text", "z_loss/vision"} <= set(out.losses)
    # two passes (image, text), one per group: their mean is the overall figure
    overall = (out.losses["load_balance/text"] + out.losses["load_balance/vision"]) / 2
    torch.testing.assert_close(out.losses["load_balance"], overall)
    assert "load_balance/text" not in ernie_vl.create_model("test")(ErnieVLBatch(
        images=torch.randn(2, 3, 32, 32), texts=torch.randint(0, 999, (2, 16)))).losses
