"""from_open_clip: an ErnieVL that starts exactly as open_clip ViT-B-32 (random init, no download)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import ernie_vl  # noqa: E402
from ernie_vl.modality import IMAGE, TEXT, VIDEO  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32").eval()
    model = ernie_vl.from_open_clip(clip, num_experts=8, top_k=2, num_frames=2)
    return clip, model


def test_text_and_image_embeddings_equal_clip(pair) -> None:
    clip, model = pair
    tokens = model.tokenizer(["a photo of a cat", "a red circle left of a blue square, seen from far away"])
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours_t, ref_t = model.encode_text(tokens), F.normalize(clip.encode_text(tokens), dim=-1)
        ours_i, ref_i = model.encode_image(images), F.normalize(clip.encode_image(images), dim=-1)
    assert torch.allclose(ours_t, ref_t, atol=1e-5), (ours_t - ref_t).abs().max()
    assert torch.allclose(ours_i, ref_i, atol=1e-5), (ours_i - ref_i).abs().max()
    # the cheaper visual path (only the class token through the backbone) starts equal too
    model.cfg.image_projector.tokens = "prefix"
    try:
        with torch.no_grad():
            cls_only = model.encode_image(images)
    finally:
        model.cfg.image_projector.tokens = "all"
    assert torch.allclose(cls_only, ref_i, atol=1e-5)


def test_video_embedding_is_the_mean_of_clip_frame_embeddings(pair) -> None:
    clip, model = pair
    clips = torch.randn(1, 2, 3, 224, 224)
    with torch.no_grad():
        ours = model.encode_video(clips)
        frames = clip.encode_image(clips.flatten(0, 1)).view(1, 2, -1)
    assert torch.allclose(ours, F.normalize(frames.mean(dim=1), dim=-1), atol=1e-5)


def test_visual_tokens_pass_through_the_moe_backbone(pair) -> None:
    clip, model = pair
    cfg = model.cfg.backbone
    assert cfg.moe_every == 1 and cfg.moe.num_experts == 8 and cfg.moe.top_k == 2
    assert len(model.backbone.blocks) == len(clip.transformer.resblocks)
    for block in model.backbone.blocks:
        assert block.is_moe
        assert block.gate.tolist() == [1.0, 0.0, 0.0]  # text open, image and video closed
    # visual tokens are routed (they reach every MoE layer), and the CLIP scale is kept
    batch = ernie_vl.model.ErnieVLBatch(images=torch.randn(1, 3, 224, 224), texts=model.tokenizer(["a cat"]))
    with torch.no_grad():
        out = model(batch)
        # training opens the visual gates: the image embedding then depends on the backbone
        model.backbone.blocks[0].gate[IMAGE] = 0.5
        opened = model.encode_image(batch.images)
        model.backbone.blocks[0].gate[IMAGE] = 0.0
    assert len(out.routing) == 12
    usage = out.routing[0].usage_by_modality
    assert usage[IMAGE].sum().item() == pytest.approx(1.0) and usage[TEXT].sum().item() == pytest.approx(1.0)
    assert usage[VIDEO].sum().item() == 0.0
    assert int(out.routing[0].num_tokens) == 50 + 4  # 1 + 7x7 image tokens, "<sot> a cat <eot>"
    assert model.logits.scale().item() == pytest.approx(clip.logit_scale.exp().item(), rel=1e-6)
    assert (out.image_embeds - opened).abs().max() > 1e-3


def test_saved_checkpoint_says_it_came_from_open_clip(pair, tmp_path) -> None:
    """``ernie-vl train`` reads this to keep the already inflated video path (no re-inflation)."""
    from ernie_vl.train.finetune import trained_on

    _, model = pair
    model.save_pretrained(str(tmp_path / "m"))
    assert trained_on(tmp_path / "m") == {"open_clip"}
