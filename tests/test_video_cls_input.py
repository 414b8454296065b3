"""``head.video_cls_input``: what ``classify_video``'s classifier reads (the video embedding or the encoder's
pooled features, as timm / mmaction2 cls heads read their backbone)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ernie_vl
from encoders.video_vit import VideoEncoder
from ernie_vl.model import ErnieVLBatch
from ernie_vl.train.finetune import init_head_from_prompts


def _model(cls_input: str, seed: int = 0):
    torch.manual_seed(seed)
    return ernie_vl.create_model("test", head={"video_cls_input": cls_input}).eval()


class _BareClassifier(nn.Module):
    """The bare video encoder and a linear head on ``.pooled``: what ``encoder`` mode must equal."""

    def __init__(self, encoder_cfg, num_classes: int) -> None:
        super().__init__()
        self.encoder = VideoEncoder(encoder_cfg)
        self.head = nn.Linear(encoder_cfg.width, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(clips).pooled)


def test_encoder_mode_equals_the_bare_encoder_with_a_linear_head():
    model = _model("encoder")
    assert model.classifier.in_features == model.cfg.video_encoder.width
    bare = _BareClassifier(model.cfg.video_encoder, model.cfg.num_classes).eval()
    bare.encoder.load_state_dict(model.video_encoder.state_dict())
    bare.head.load_state_dict(model.classifier.state_dict())
    clips = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model.classify_video(clips), bare(clips)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.std() > 0  # not a constant output


def test_training_forward_uses_the_same_logits_and_trains_the_encoder():
    model = _model("encoder")
    clips = torch.randn(4, 4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected = model.classify_video(clips)
    out = model(ErnieVLBatch(videos=clips, video_labels=labels))
    torch.testing.assert_close(out.video_logits.detach(), expected, rtol=1e-5, atol=1e-6)
    out.losses["video_cls"].backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.video_encoder.patch_embed.weight.grad.abs().sum() > 0
    # the projector / backbone path carries no classification gradient in this mode
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.video_projector.parameters())


def test_embed_mode_is_unchanged_default():
    model = _model("embed")
    assert ernie_vl.load_config("test").head.video_cls_input == "embed"
    clips = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.classify_video(clips),
                                   model.classifier(model.video_features(clips, routing=False).embeds))


def test_tiny_reads_the_encoder():
    assert ernie_vl.load_config("tiny").head.video_cls_input == "encoder"


def test_unknown_cls_input_names_the_valid_ones():
    with pytest.raises(ValueError, match="video_cls_input.*embed.*encoder"):
        ernie_vl.load_config("test", head={"video_cls_input": "backbone"})


def test_checkpoint_round_trip(tmp_path):
    model = _model("encoder")
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.cfg.head.video_cls_input == "encoder"
    clips = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.classify_video(clips), model.classify_video(clips))


def test_prompt_init_leaves_an_encoder_classifier_alone():
    model = _model("encoder")
    before = model.classifier.weight.detach().clone()
    tokens = [model.tokenizer([f"class {i}"]) for i in range(model.cfg.num_classes)]
    assert init_head_from_prompts(model, tokens, torch.randn(2, 4, 3, 32, 32)) is False
    torch.testing.assert_close(model.classifier.weight, before)
    embed = _model("embed")
    assert init_head_from_prompts(embed, tokens, torch.randn(2, 4, 3, 32, 32)) is True
