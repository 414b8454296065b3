"""int8 quantization: every linear quantized, embeddings close to fp32, size, save / load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ernie_vl
from ernie_vl.quantize import Int8Linear, Int8MoEFeedForward, quantize_weight, state_dict_bytes
from tests._model_helpers import make_batch


@pytest.fixture(scope="module")
def models() -> tuple[ernie_vl.ErnieVL, ernie_vl.ErnieVL]:
    torch.manual_seed(0)
    model = ernie_vl.create_model("test").eval()
    return model, ernie_vl.quantize_int8(model)


def test_weight_quantization_round_trips_within_half_a_step() -> None:
    w = torch.randn(6, 10)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)


def test_int8_linear_matches_float_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    y = Int8Linear.from_linear(linear)(x)
    ref = linear(x)
    assert y.shape == ref.shape
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999


def test_every_linear_and_moe_layer_is_quantized(models) -> None:
    model, q = models
    assert not [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    n_moe = sum(1 for b in model.backbone.blocks if b.is_moe)
    assert sum(1 for m in q.modules() if isinstance(m, Int8MoEFeedForward)) == n_moe
    # attention projections of the encoders and the backbone are int8 too
    assert isinstance(q.image_encoder.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(q.backbone.blocks[0].attn.proj, Int8Linear)
    # the original model is left untouched
    assert isinstance(model.image_encoder.blocks[0].attn.qkv, nn.Linear)


def test_quantized_embeddings_stay_close_and_the_model_shrinks(models) -> None:
    model, q = models
    batch = make_batch(model, pairs=4, videos=2)
    with torch.no_grad():
        for fn, x in (("encode_image", batch.images), ("encode_text", batch.texts), ("encode_video", batch.videos)):
            cos = F.cosine_similarity(getattr(model, fn)(x), getattr(q, fn)(x))
            assert cos.min() > 0.99, (fn, cos)
    assert state_dict_bytes(q) < 0.4 * state_dict_bytes(model)  # float LayerNorms weigh more in a tiny model


def test_quantized_model_saves_and_loads(models, tmp_path) -> None:
    model, q = models
    q.save_pretrained(str(tmp_path / "int8"))
    loaded = ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "int8"))
    assert isinstance(loaded.backbone.blocks[0].attn.qkv, Int8Linear)
    batch = make_batch(model, pairs=2, videos=1)
    with torch.no_grad():
        assert torch.equal(q.encode_image(batch.images), loaded.encode_image(batch.images))
        assert torch.equal(q.encode_text(batch.texts), loaded.encode_text(batch.texts))
        assert torch.equal(q.encode_video(batch.videos), loaded.encode_video(batch.videos))
    size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    model.save_pretrained(str(tmp_path / "fp32"))
    assert size < 0.4 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
