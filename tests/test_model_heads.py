"""Alignment projectors, pooling, embedding heads, logit scale, image transform, tokenizer folding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ernie_vl.config import ProjectorConfig
from ernie_vl.heads import ContrastiveLogits, EmbeddingHead, build_projector, pool_text_eot, pool_visual
from ernie_vl.preprocess import CLIP_MEAN, CLIP_STD, FoldedTokenizer, ImageTransform, make_tokenizer


def test_linear_and_mlp_projectors_keep_tokens_and_match_their_formulas() -> None:
    x = torch.randn(2, 5, 12)
    lin = build_projector(ProjectorConfig(kind="linear"), 12, 8)
    y, prefix = lin(x, 1)
    assert prefix == 1 and torch.allclose(y, x @ lin.proj.weight.t() + lin.proj.bias)
    mlp = build_projector(ProjectorConfig(kind="mlp", mlp_ratio=2.0), 12, 8)
    y, _ = mlp(x, 1)
    assert mlp.fc1.out_features == 16
    assert torch.allclose(y, mlp.fc2(F.gelu(mlp.fc1(x))))


def test_resampler_turns_any_number_of_tokens_into_m_queries() -> None:
    res = build_projector(ProjectorConfig(kind="resampler", num_queries=3, num_heads=2, depth=2), 12, 8)
    for n in (5, 40):
        y, prefix = res(torch.randn(2, n, 12), 1)
        assert y.shape == (2, 3, 8) and prefix == 3
    # each sample's queries depend only on its own tokens
    x = torch.randn(3, 7, 12)
    together, _ = res(x, 1)
    alone, _ = res(x[1:2], 1)
    assert torch.allclose(together[1:2], alone, atol=1e-6)
    # permuting the visual tokens does not change the result (no positions inside)
    shuffled, _ = res(x[:, torch.randperm(7)], 1)
    assert torch.allclose(shuffled, together, atol=1e-5)


def test_pooling() -> None:
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(pool_visual(h, "cls", 1), h[:, 0])
    assert torch.equal(pool_visual(h, "cls", 2), (h[:, 0] + h[:, 1]) / 2)
    assert torch.equal(pool_visual(h, "mean", 1), h.mean(1))
    tokens = torch.tensor([[5, 7, 9, 0], [5, 9, 0, 0]])
    assert torch.equal(pool_text_eot(h, tokens), torch.stack([h[0, 2], h[1, 1]]))


def test_embedding_head_and_logit_scale() -> None:
    head = EmbeddingHead(6, 4, norm=True)
    x = torch.randn(3, 6)
    assert torch.allclose(head(x), F.layer_norm(x, (6,), head.norm.weight, head.norm.bias) @ head.proj.weight.t())
    logits = ContrastiveLogits(1 / 0.07, 100.0, None)
    assert logits.scale().item() == pytest.approx(1 / 0.07, rel=1e-6) and logits.bias is None
    with torch.no_grad():
        logits.log_scale.fill_(math.log(500.0))
    assert logits.scale().item() == pytest.approx(100.0)
    assert ContrastiveLogits(10.0, 100.0, -10.0).bias.item() == -10.0


def test_image_transform_resizes_crops_and_normalises() -> None:
    tf = ImageTransform(32)
    colour = (200, 100, 50)
    out = tf(Image.new("RGB", (100, 50), colour))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)
    # grayscale and RGBA are converted; a left/right split survives the centre crop
    img = Image.new("L", (64, 64), 0)
    img.paste(255, (32, 0, 64, 64))
    gray = tf(img)
    assert gray[:, :, :10].mean() < 0 < gray[:, :, -10:].mean()
    assert tf(Image.new("RGBA", (40, 40))).shape == (3, 32, 32)
    with pytest.raises(TypeError, match="PIL"):
        tf(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="image_size"):
        ImageTransform(0)


def test_folded_tokenizer_keeps_the_end_of_text_the_largest_id() -> None:
    tok = make_tokenizer(1000, 16)
    assert isinstance(tok, FoldedTokenizer)
    ids = tok(["a photo of a cat", "a much longer caption that goes on and on beyond sixteen tokens for sure"])
    assert ids.shape == (2, 16) and int(ids.max()) < 1000
    assert torch.equal(ids.argmax(dim=-1), torch.tensor([6, 15]))
    assert (ids[:, 0] == 998).all() and (ids.max(dim=-1).values == 999).all()
    assert make_tokenizer(49408, 77)(["a cat"]).shape == (1, 77)
