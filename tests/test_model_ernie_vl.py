"""The ErnieVL model on the `test` and `tiny` presets: shapes, gradients, losses, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ernie_vl
from ernie_vl.model import ErnieVLBatch, ErnieVLOutput
from tests._model_helpers import make_batch, parameters_without_grad


@pytest.fixture(scope="module")
def model() -> ernie_vl.ErnieVL:
    torch.manual_seed(0)
    return ernie_vl.create_model("test")


def test_encoders_give_normalised_embeddings_of_the_configured_size(model) -> None:
    batch = make_batch(model)
    e = model.cfg.head.embed_dim
    with torch.no_grad():
        img, txt, vid = model.encode_image(batch.images), model.encode_text(batch.texts), model.encode_video(batch.videos)
        logits = model.classify_video(batch.videos)
    assert img.shape == (3, e) and txt.shape == (3, e) and vid.shape == (2, e)
    for emb in (img, txt, vid):
        assert torch.allclose(emb.norm(dim=-1), torch.ones(emb.shape[0]), atol=1e-5)
    assert logits.shape == (2, model.cfg.num_classes)


def test_shapes_come_from_the_input(model) -> None:
    # a 2-frame clip on a 4-frame model, 48 px images on a 32 px model, a 5-token text
    batch = make_batch(model, frames=2)
    with torch.no_grad():
        assert model.encode_video(batch.videos).shape == (2, model.cfg.head.embed_dim)
        assert model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, model.cfg.head.embed_dim)
        assert model.encode_text(batch.texts[:, :5]).shape == (3, model.cfg.head.embed_dim)


def test_dual_encoder_text_embedding_does_not_depend_on_the_batch(model) -> None:
    tokens = model.tokenizer(["a red circle", "a blue square", "a green triangle left of a circle"])
    with torch.no_grad():
        together = model.encode_text(tokens)
        alone = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(3)])
        # padding after the end-of-text token does not change the embedding
        trimmed = model.encode_text(tokens[:1, :6])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(trimmed, together[:1], atol=1e-5)


def test_text_padding_is_trimmed_exactly(model) -> None:
    """The text path cuts the columns after the last EOT: same embeddings, aux losses and stats as the full context."""
    from ernie_vl.backbone import causal_mask
    from ernie_vl.heads import pool_text_eot
    from ernie_vl.modality import TEXT

    tokens = model.tokenizer(["a red circle", "a large blue square left of a small green triangle", "x"])
    longest = int(tokens.argmax(dim=-1).max()) + 1
    assert longest < tokens.shape[1]
    with torch.no_grad():
        fast = model.text_features(tokens)
        # the reference: the whole padded context through the backbone, padding masked
        length = tokens.shape[1]
        padding = torch.arange(length)[None, :] > tokens.argmax(dim=-1)[:, None]
        ids = torch.full(tokens.shape, TEXT, dtype=torch.long)
        full = model.backbone(model.text_embedding(tokens), ids, attn_mask=causal_mask(length, tokens.device),
                              padding_mask=padding)
        embeds = model.text_head(pool_text_eot(full.hidden, tokens))
    assert fast.backbone.hidden.shape[1] == longest
    torch.testing.assert_close(fast.embeds, embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.backbone.hidden, full.hidden[:, :longest], atol=1e-5, rtol=0)
    for name in ("aux_loss", "load_balance_loss", "z_loss", "orthogonal_loss"):
        torch.testing.assert_close(getattr(fast.backbone, name), getattr(full, name), atol=1e-6, rtol=1e-5)
    for a, b in zip(fast.backbone.layer_stats, full.layer_stats):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)


def test_forward_losses_match_their_definitions(model) -> None:
    batch = make_batch(model)
    out = model(batch)
    assert isinstance(out, ErnieVLOutput)
    assert set(out.losses) >= {"image_text", "video_cls", "video_text", "aux"}
    w = model.cfg.loss
    expected = (w.pair_weight * out.losses["image_text"] + w.classification_weight * out.losses["video_cls"]
                + w.video_text_weight * out.losses["video_text"] + w.aux_weight * out.losses["aux"])
    assert torch.allclose(out.loss, expected)
    # the image-text loss is CLIP's InfoNCE over the returned embeddings
    logits = out.logit_scale * out.image_embeds @ out.text_embeds.t()
    labels = torch.arange(3)
    infonce = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert out.losses["image_text"].item() == pytest.approx(infonce.item(), rel=1e-5)
    assert torch.allclose(out.per_sample_loss["pairs"].mean(), out.losses["image_text"].detach(), atol=1e-6)
    assert out.per_sample_loss["videos"].shape == (2,)
    cls_ps = F.cross_entropy(out.video_logits, batch.video_labels, reduction="none", label_smoothing=w.label_smoothing)
    assert torch.all(out.per_sample_loss["videos"] >= cls_ps.detach() - 1e-6)
    # routing: one merged RoutingStats per MoE layer, covering text and visual tokens
    assert len(out.routing) == sum(1 for b in model.backbone.blocks if b.is_moe)
    stats = out.routing[0]
    assert int(stats.tokens_per_expert.sum()) == int(stats.num_tokens) * model.cfg.backbone.moe.top_k
    assert torch.allclose(stats.usage_by_modality.sum(dim=1), torch.ones(3), atol=1e-5)
    assert 0.0 <= float(stats.overlap_rate) <= 1.0


@pytest.mark.parametrize("preset", ["test", "tiny"])
def test_every_parameter_gets_a_gradient(preset: str) -> None:
    torch.manual_seed(0)
    model = ernie_vl.create_model(preset)
    # the video encoder's temporal branch starts as a no-op (zero output projection), so the
    # parameters before it get an exactly zero gradient at init; open it slightly to see them
    with torch.no_grad():
        for name, p in model.video_encoder.named_parameters():
            if "temporal_proj" in name:
                p.normal_(std=0.02)
    batch = make_batch(model, pairs=2, videos=2, frames=4 if preset == "tiny" else None)
    model(batch).loss.backward()
    assert parameters_without_grad(model) == []


@pytest.mark.parametrize("parts", ["pairs", "videos_labels", "videos_texts"])
def test_batches_with_only_some_parts(model, parts: str) -> None:
    batch = make_batch(model, pairs=2 if parts == "pairs" else 0, videos=0 if parts == "pairs" else 2,
                       labels=parts != "videos_texts", video_texts=parts != "videos_labels")
    out = model(batch)
    assert torch.isfinite(out.loss)
    assert ("pairs" in out.per_sample_loss) == (parts == "pairs")
    assert ("videos" in out.per_sample_loss) == (parts != "pairs")


def test_siglip_loss_is_used_when_configured() -> None:
    torch.manual_seed(0)
    model = ernie_vl.create_model("test", loss={"contrastive": "siglip"})
    assert model.logits.bias is not None and model.logits.bias.item() == -10.0
    assert model.logits.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    out = model(make_batch(model, videos=0))
    out.loss.backward()
    assert model.logits.bias.grad is not None and model.logits.bias.grad.abs() > 0


def test_bad_input_raises_clear_errors(model) -> None:
    batch = make_batch(model)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_image(batch.videos)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        model.encode_video(batch.images)
    with pytest.raises(ValueError, match="context_length 16"):
        model.encode_text(torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model.encode_text(torch.ones(2, 5))
    with pytest.raises(ValueError, match="images has 3 rows but texts has 2"):
        model(ErnieVLBatch(images=batch.images, texts=batch.texts[:2]))
    with pytest.raises(ValueError, match="videos has 2 rows but video_labels has 1"):
        model(ErnieVLBatch(videos=batch.videos, video_labels=batch.video_labels[:1]))
    with pytest.raises(ValueError, match="captions"):
        model(ErnieVLBatch(images=batch.images))
    with pytest.raises(ValueError, match=r"out of range; valid: 0..4"):
        model(ErnieVLBatch(videos=batch.videos, video_labels=torch.tensor([0, 7])))
    with pytest.raises(TypeError, match="ErnieVLBatch"):
        model({"images": batch.images})


def test_model_attributes(model) -> None:
    assert model.model_id == "ernie-vl:test"
    assert model.class_names is None
    assert model.preprocess.image_size == 32
    assert len(model.preprocess.mean) == 3 and len(model.preprocess.std) == 3
    tokens = model.tokenizer(["a cat", "a much longer caption that will not fit in sixteen tokens at all, no"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.int64
    named = ernie_vl.create_model("test", class_names=["left", "right", "up"])
    assert named.class_names == ["left", "right", "up"] and named.classifier.out_features == 3


def test_video_text_loss_treats_clips_of_one_class_as_positives(model) -> None:
    """Class prompts recur in a video batch: the video-text loss spreads each clip's target over the
    prompts of its class (soft mixup targets: the dominant class), so a same-class clip is no negative."""
    from ernie_vl.losses import clip_loss
    from ernie_vl.model import video_text_groups

    batch = make_batch(model, pairs=0, videos=4)
    batch.video_labels = torch.tensor([1, 1, 0, 1])
    out = model(batch)
    grouped, _ = clip_loss(out.video_embeds, out.video_text_embeds, out.logit_scale, batch.video_labels)
    plain, _ = clip_loss(out.video_embeds, out.video_text_embeds, out.logit_scale)
    assert out.losses["video_text"].item() == pytest.approx(grouped.item(), rel=1e-5)
    assert abs(grouped.item() - plain.item()) > 1e-3
    soft = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    assert video_text_groups(soft).tolist() == [1, 0]
    assert video_text_groups(None) is None


@pytest.mark.parametrize("contrastive", ["clip", "siglip"])
def test_identical_captions_are_positives_of_each_other_in_the_pair_loss(contrastive: str) -> None:
    """Unique captions: the image-text loss is exactly CLIP's / SigLIP's pairs. A caption repeated in the
    batch (a labelled set captioned from its labels): its images are positives of each other's copies, unless
    ``loss.caption_positives`` is off. For InfoNCE whose repeated captions embed identically, the batch mean
    (so every parameter's gradient) is the same either way; the per-sample losses differ. SigLIP's mean
    differs: the copies' cross pairs turn from negatives into positives."""
    from ernie_vl.losses import caption_groups, clip_loss, siglip_loss

    torch.manual_seed(0)
    model = ernie_vl.create_model("test", loss={"contrastive": contrastive})
    assert not model.cfg.loss.caption_positives  # off by default (an opt-in; see LossConfig)

    def pair_loss(out, groups):
        if contrastive == "siglip":
            return siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, model.logits.bias, groups)
        return clip_loss(out.image_embeds, out.text_embeds, out.logit_scale, groups)

    unique = make_batch(model, pairs=4, videos=0)
    repeated = make_batch(model, pairs=4, videos=0)
    repeated.texts = model.tokenizer(["the digit 3", "the digit 5", "the digit 3", "the digit 3"])
    groups = caption_groups(repeated.texts)
    assert groups.tolist() == [0, 1, 0, 0]
    for on in (True, False):
        model.cfg.loss.caption_positives = on
        with torch.no_grad():
            out = model(unique)
            assert out.losses["image_text"].item() == pair_loss(out, None)[0].item()  # bit-identical to the old loss
            out = model(repeated)
        expected, per_sample = pair_loss(out, groups if on else None)
        assert out.losses["image_text"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert torch.allclose(out.per_sample_loss["pairs"], per_sample, rtol=1e-6, atol=1e-6)
    (grouped, grouped_ps), (plain, plain_ps) = pair_loss(out, groups), pair_loss(out, None)
    assert (grouped_ps - plain_ps).abs().max() > 1e-3
    if contrastive == "clip":
        assert grouped.item() == pytest.approx(plain.item(), rel=1e-6)
    else:  # at initialisation (bias -10) every pair scores as a negative, so the new positives cost more
        assert grouped.item() > plain.item() + 1e-3


def test_video_texts_without_labels_group_identical_captions(model) -> None:
    """Clips given free captions (no labels): identical captions are positives, as for image-text pairs."""
    from ernie_vl.losses import clip_loss

    batch = make_batch(model, pairs=0, videos=3, labels=False)
    batch.video_texts = model.tokenizer(["a dog runs", "a cat", "a dog runs"])
    with torch.no_grad():
        out = model(batch)
    grouped, _ = clip_loss(out.video_embeds, out.video_text_embeds, out.logit_scale, torch.tensor([0, 1, 0]))
    assert out.losses["video_text"].item() == pytest.approx(grouped.item(), rel=1e-6)
