"""Quantization-aware fine-tuning: the fake-quant model computes what the int8 model computes, and a few
QAT steps shrink the int8-vs-fp32 gap on a small task."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ernie_vl
from ernie_vl.quantize import (
    Int8Embedding,
    Int8Linear,
    available_int8_kernels,
    quantize_activation,
    quantize_int8,
    quantize_weight,
    set_int8_kernel,
)
from ernie_vl.quantize_aware import (
    QATEmbedding,
    QATLinear,
    QATMLPExperts,
    QATPatchEmbed,
    convert_qat,
    fake_quant_activation,
    fake_quant_weight,
    is_qat,
    prepare_qat,
    strip_qat,
)
from tests._model_helpers import make_batch

KERNELS = available_int8_kernels()


@pytest.fixture(scope="module")
def model() -> ernie_vl.ErnieVL:
    torch.manual_seed(0)
    return ernie_vl.create_model("test").eval()


def test_fake_quant_weight_is_quantize_weight_dequantized() -> None:
    w = torch.randn(7, 33, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_weight(w)
    assert torch.equal(fake_quant_weight(w), q.float() * scale[:, None])


@pytest.mark.parametrize("qmax", [127, 255])
def test_fake_quant_activation_is_quantize_activation_dequantized(qmax) -> None:
    x = torch.randn(5, 19, generator=torch.Generator().manual_seed(2)) * 3 + 0.5
    data, scale, zero_point = quantize_activation(x, qmax)
    assert int(data.max()) == qmax
    expected = (data.float() - zero_point) * scale
    assert torch.allclose(fake_quant_activation(x, qmax), expected, rtol=0, atol=1e-6)
    assert (fake_quant_activation(x, qmax) - x).abs().max() <= scale / 2 + 1e-6  # on the grid, not x itself
    assert not torch.equal(fake_quant_activation(x, qmax), x)


def test_gradients_pass_the_rounding_straight_through() -> None:
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)
    (fake_quant_weight(w) * 2).sum().backward()
    (fake_quant_activation(x) * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0)) and torch.equal(x.grad, torch.full_like(x, 3.0))


def test_prepare_swaps_every_quantized_layer_and_strip_restores(model) -> None:
    qat = prepare_qat(copy.deepcopy(model))
    assert is_qat(qat)
    types = {type(m) for m in qat.modules()}
    assert {QATLinear, QATEmbedding, QATMLPExperts, QATPatchEmbed} <= types
    assert nn.Linear not in types  # every float linear is fake-quant ...
    assert type(qat.backbone.modality_embed) is nn.Embedding  # ... but the modality table stays float, as in int8
    params = [p for p in qat.parameters()]
    strip_qat(qat)
    assert not is_qat(qat) and [p for p in qat.parameters()] == params  # the same parameter objects
    for a, b in zip(qat.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already int8"):
        prepare_qat(quantize_int8(model))


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("bits", [7, 8])
def test_fake_quant_model_equals_the_converted_int8_model(model, kernel, bits) -> None:
    """Per activation grid (7 bits: fbgemm's reduce_range; 8 bits: VNNI / AMX) and per engine."""
    qat = prepare_qat(copy.deepcopy(model), activation_bits=bits).eval()
    int8 = convert_qat(qat)
    assert is_qat(qat)  # converting leaves the QAT model as it was
    grids = {m.grid for m in int8.modules() if hasattr(m, "grid")}
    assert grids == {(1 << bits) - 1}  # every converted layer runs the grid its fake-quant twin trained with
    batch = make_batch(model, pairs=4, videos=3)
    with torch.no_grad():
        pairs = [(qat.encode_image(batch.images), int8.encode_image(batch.images), model.encode_image(batch.images)),
                 (qat.encode_text(batch.texts), int8.encode_text(batch.texts), model.encode_text(batch.texts)),
                 (qat.encode_video(batch.videos), int8.encode_video(batch.videos), model.encode_video(batch.videos)),
                 (qat.classify_video(batch.videos), int8.classify_video(batch.videos),
                  model.classify_video(batch.videos))]
    for fake, real, fp32 in pairs:
        gap = (real - fp32).abs().max().item()  # what int8 changes
        err = (fake - real).abs().max().item()  # what fake-quant misses of it
        assert err < 1e-5, (err, gap)  # float rounding only (measured ~1e-7)
        assert gap > 1e-3 and gap > 100 * err  # the comparison can tell int8 from fp32


def test_converted_layers_hold_the_fake_quant_weights(model) -> None:
    qat = prepare_qat(copy.deepcopy(model))
    int8 = convert_qat(qat)
    lin = qat.text_head.proj if isinstance(getattr(qat.text_head, "proj", None), nn.Linear) else next(
        m for m in qat.modules() if isinstance(m, QATLinear))
    name = next(n for n, m in qat.named_modules() if m is lin)
    converted = dict(int8.named_modules())[name]
    assert isinstance(converted, Int8Linear)
    assert torch.allclose(converted.dequantized_weight(), fake_quant_weight(lin.weight).detach(), rtol=0, atol=1e-7)
    emb = next(m for m in int8.modules() if isinstance(m, Int8Embedding))
    assert emb.weight_int8.dtype == torch.int8


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_qat_steps_shrink_the_int8_gap_more_than_the_same_float_steps() -> None:
    """A small MLP regression whose input has one channel 30x wider than the others (so 7-bit per-tensor
    activations are coarse): after the same 120 fine-tuning steps, the QAT model's int8 error is clearly
    below both the post-training int8 error and the int8 error of plain float fine-tuning."""
    previous = set_int8_kernel(KERNELS[0])
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        scale = torch.ones(16)
        scale[0] = 30.0
        x = torch.randn(2048, 16, generator=g) * scale
        teacher = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        with torch.no_grad():
            y = teacher(x / scale)
        net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        _fit(net, x, y, 300, 3e-3, seed=1)
        plain, qat = copy.deepcopy(net), prepare_qat(copy.deepcopy(net), activation_bits=7)
        _fit(plain, x, y, 120, 1e-3, seed=2)
        _fit(qat, x, y, 120, 1e-3, seed=2)
        with torch.no_grad():
            fp32 = F.mse_loss(net(x), y).item()
            ptq = F.mse_loss(quantize_int8(net, activation_bits=7)(x), y).item()
            plain_int8 = F.mse_loss(quantize_int8(plain, activation_bits=7)(x), y).item()
            qat_int8 = F.mse_loss(convert_qat(qat)(x), y).item()
        assert ptq > 2 * fp32  # int8 costs something on this task
        assert qat_int8 < 0.92 * ptq, (fp32, ptq, plain_int8, qat_int8)
        assert qat_int8 < 0.95 * plain_int8, (fp32, ptq, plain_int8, qat_int8)  # the fake-quant, not the steps
    finally:
        set_int8_kernel(previous)
