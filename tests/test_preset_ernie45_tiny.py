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
    clips = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_video(clips), int8.encode_video(clips))
    assert float(cos.min()) > 0.99


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
