"""int8 engines: the probe's decision under noisy timings (fake timers, no timing here), the activation
grid per engine and per layer, the fused residual add, and the grid saved with a checkpoint."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ernie_vl
from ernie_vl import int8_engines
from ernie_vl.int8_engines import (ACT_QMAX_7BIT, ACT_QMAX_8BIT, DEFAULT_KERNEL, PROBE_MARGIN, PROBE_REPEATS,
                                   activation_qmax, available_int8_kernels, choose_kernel, int8_kernel,
                                   kernel_for_grid, layer_activation_qmax, probe_records, quantize_activation,
                                   set_int8_kernel, set_int8_probe)
from ernie_vl.quantize import SCHEMES, Int8Linear, quantization_scheme
from tests._model_helpers import make_batch

KERNELS = available_int8_kernels()
both = pytest.mark.skipif(len(KERNELS) < 2, reason="needs both int8 kernels")


@pytest.fixture
def fake_timer():
    """Install a fake probe timer: ``install(fn)`` where fn(kernel, call_index) -> seconds; records the calls."""
    calls: list[str] = []

    def install(fn):
        def timer(kernel, rows, k, n, activation):
            calls.append(kernel)
            return fn(kernel, len(calls) - 1)
        set_int8_probe(timer)
        return calls

    previous = int8_engines._probe[0]
    yield install
    set_int8_probe(previous)


def test_choose_kernel_keeps_the_default_within_the_margin() -> None:
    other = "onednn" if DEFAULT_KERNEL == "fbgemm" else "fbgemm"
    close = 1.0 - PROBE_MARGIN / 2  # faster, but by less than the margin
    assert choose_kernel({DEFAULT_KERNEL: [1.0] * 5, other: [close] * 5}) == DEFAULT_KERNEL
    clear = 1.0 - 2 * PROBE_MARGIN
    assert choose_kernel({DEFAULT_KERNEL: [1.0] * 5, other: [clear] * 5}) == other
    assert choose_kernel({DEFAULT_KERNEL: [1.0] * 5, other: [2.0] * 5}) == DEFAULT_KERNEL
    # medians, not means or minima: one lucky or one stalled sample does not decide
    assert choose_kernel({DEFAULT_KERNEL: [1.0] * 5, other: [0.1, 2.0, 2.0, 2.0, 2.0]}) == DEFAULT_KERNEL
    assert choose_kernel({DEFAULT_KERNEL: [1.0, 1.0, 9.0, 9.0, 1.0], other: [0.95] * 5}) == DEFAULT_KERNEL
    assert choose_kernel({"onednn": [2.0], "fbgemm": [1.0]}, default="onednn", margin=0.0) == "fbgemm"
    with pytest.raises(ValueError, match="at least one timed sample"):
        choose_kernel({"onednn": []})


@both
def test_probe_interleaves_kernels_in_rotated_order(fake_timer) -> None:
    calls = fake_timer(lambda kernel, i: 1.0)
    int8_kernel(96, 32, 48)
    assert len(calls) == 2 * PROBE_REPEATS
    rounds = [tuple(calls[i:i + 2]) for i in range(0, len(calls), 2)]
    assert all(set(r) == set(KERNELS) for r in rounds)  # both kernels in every round
    firsts = [r[0] for r in rounds]
    assert all(abs(firsts.count(k) - PROBE_REPEATS / 2) <= 0.5 for k in KERNELS)  # each goes first as often
    record = probe_records()[(96, 32, 48, torch.get_num_threads(), None)]
    assert record.kernel == DEFAULT_KERNEL and "default" in record.reason  # a tie keeps the default
    assert all(len(v) == PROBE_REPEATS for v in record.samples.values())


@both
def test_a_load_burst_does_not_flip_the_choice(fake_timer) -> None:
    """oneDNN is truly 30% faster; a burst of load makes the calls it covers 4x slower. Samples one
    kernel after the other (the burst landing on all of oneDNN's) would pick fbgemm; interleaved
    rounds and medians keep oneDNN."""
    true = {"onednn": 0.7, "fbgemm": 1.0}
    burst = range(0, 6)  # the first three rounds

    calls = fake_timer(lambda kernel, i: true[kernel] * (4.0 if i in burst else 1.0))
    assert int8_kernel(128, 64, 64) == "onednn"
    record = probe_records()[(128, 64, 64, torch.get_num_threads(), None)]
    assert record.medians["onednn"] == pytest.approx(0.7) and "faster than" in record.reason
    assert sum(1 for i, k in enumerate(calls) if i in burst and k == "onednn") == 3  # the burst hit both alike

    # the same burst on a one-kernel-after-the-other schedule picks the slower engine
    sequential = {"onednn": [true["onednn"] * 4.0] * 6 + [0.7], "fbgemm": [1.0] * 7}
    assert choose_kernel(sequential) == "fbgemm"


@both
def test_noise_below_the_margin_keeps_the_default(fake_timer) -> None:
    other = "onednn" if DEFAULT_KERNEL == "fbgemm" else "fbgemm"
    fake_timer(lambda kernel, i: 1.0 if kernel == DEFAULT_KERNEL else 0.95 + 0.01 * (i % 3))
    assert int8_kernel(64, 64, 64) == DEFAULT_KERNEL
    fake_timer(lambda kernel, i: 1.0 if kernel == DEFAULT_KERNEL else 0.5)
    assert int8_kernel(64, 64, 32) == other


def test_activation_grid_follows_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(int8_engines, "_accumulates_in_32_bits", lambda: False)
    assert {activation_qmax(k) for k in ("onednn", "fbgemm")} == {ACT_QMAX_7BIT}
    assert layer_activation_qmax() == ACT_QMAX_7BIT and layer_activation_qmax(255) == 255
    monkeypatch.setattr(int8_engines, "_accumulates_in_32_bits", lambda: True)
    assert {activation_qmax(k) for k in ("onednn", "fbgemm")} == {ACT_QMAX_8BIT}
    assert layer_activation_qmax() == ACT_QMAX_8BIT
    with pytest.raises(ValueError, match="unknown int8 kernel 'avx'"):
        activation_qmax("avx")
    with pytest.raises(ValueError, match="activation grid must be one of"):
        layer_activation_qmax(100)


def test_an_8_bit_layer_on_a_cpu_without_vnni_warns(monkeypatch) -> None:
    monkeypatch.setattr(int8_engines, "_accumulates_in_32_bits", lambda: False)
    monkeypatch.setattr(int8_engines, "_grid_warned", set())
    assert kernel_for_grid(KERNELS[0], ACT_QMAX_7BIT) == KERNELS[0]
    with pytest.warns(RuntimeWarning, match="without VNNI"):
        assert kernel_for_grid(KERNELS[0], ACT_QMAX_8BIT) == KERNELS[0]


def test_8_bit_activation_quantization_uses_the_full_range() -> None:
    x = torch.tensor([[-1.5, 0.0, 0.25], [3.0, -0.75, 1.0]])
    q, scale, zero_point = quantize_activation(x, ACT_QMAX_8BIT)
    assert int(q.min()) == 0 and int(q.max()) == 255
    assert scale == pytest.approx(4.5 / 255) and zero_point == round(1.5 / scale)
    dequant = (q.float() - zero_point) * scale
    assert dequant[0, 1] == 0.0 and torch.all((dequant - x).abs() <= scale / 2 + 1e-6)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("qmax", [ACT_QMAX_7BIT, ACT_QMAX_8BIT])
def test_the_8_bit_grid_halves_the_error_and_the_residual_add_is_fused(kernel, qmax) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x, r = torch.randn(50, 64), torch.randn(50, 96)
    layer = Int8Linear.from_linear(linear, act_qmax=qmax)
    assert layer.grid == qmax
    ref = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    err = (layer(x) - ref).abs().max().item()
    step = (x.max() - x.min()).item() / qmax
    assert err < step * layer.dequantized_weight().abs().sum(dim=1).max().item() / 4
    torch.testing.assert_close(layer(x, residual=r), layer(x) + r, rtol=0, atol=1e-5)
    if qmax == ACT_QMAX_8BIT:  # same input on 7 bits: about twice the error
        err7 = (Int8Linear.from_linear(linear, act_qmax=ACT_QMAX_7BIT)(x) - ref).abs().max().item()
        assert err < 0.75 * err7


def test_the_grid_is_saved_and_old_schemes_stay_7_bit(tmp_path) -> None:
    torch.manual_seed(0)
    model = ernie_vl.create_model("test").eval()
    q7 = ernie_vl.quantize_int8(model, activation_bits=7)
    assert quantization_scheme(q7) == SCHEMES[-1]
    assert {m.grid for m in q7.modules() if hasattr(m, "grid")} == {ACT_QMAX_7BIT}
    q7.save_pretrained(str(tmp_path / "q7"))
    loaded = ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "q7"))
    assert {m.grid for m in loaded.modules() if hasattr(m, "grid")} == {ACT_QMAX_7BIT}
    images = make_batch(model, pairs=2, videos=1).images
    with torch.no_grad():
        assert torch.equal(q7.encode_image(images), loaded.encode_image(images))
        q8 = ernie_vl.quantize_int8(model, activation_bits=8)
        assert not torch.equal(q8.encode_image(images), q7.encode_image(images))
    v2 = ernie_vl.quantize_int8(model, scheme=SCHEMES[1])
    assert quantization_scheme(v2) == SCHEMES[1] and {m.grid for m in v2.modules() if hasattr(m, "grid")} == {127}
    with pytest.raises(ValueError, match="quantizes activations to 7 bits"):
        ernie_vl.quantize_int8(model, scheme=SCHEMES[1], activation_bits=8)
    with pytest.raises(ValueError, match="activation_bits must be 7, 8 or None"):
        ernie_vl.quantize_int8(model, activation_bits=4)


def test_a_forced_kernel_decides_the_grid_of_new_layers(monkeypatch) -> None:
    monkeypatch.setattr(int8_engines, "activation_qmax", lambda k: 255 if k == "onednn" else 127)
    if "onednn" in KERNELS:
        previous = set_int8_kernel("onednn")
        try:
            assert layer_activation_qmax() == 255
        finally:
            set_int8_kernel(previous)
    if len(KERNELS) == 2:
        assert layer_activation_qmax() == 127  # auto may run a layer on either: the grid both run


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int8_blocks_fuse_the_residual_adds_and_match_the_unfused_path(kernel, monkeypatch) -> None:
    import copy

    import ernie_vl.quantize as quantize
    from encoders.vit import ImageEncoder, ImageEncoderConfig
    from ernie_vl.quantize import Int8Block, quantize_modules

    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(image_size=64, patch_size=16, width=64, depth=2, num_heads=4)).eval()
    q = quantize_modules(copy.deepcopy(enc))
    assert all(type(b) is Int8Block for b in q.blocks)
    residuals = []
    real = quantize.int8_linear

    def spy(x, packed, kernel, activation=None, qmax=127, residual=None):
        residuals.append(residual is not None)
        return real(x, packed, kernel, activation, qmax, residual)

    monkeypatch.setattr(quantize, "int8_linear", spy)
    monkeypatch.setattr(Int8Block, "fuse_residual", True)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fused = q(images).tokens
        assert sum(residuals) == 2 * len(q.blocks)  # out-proj and fc2 of each block take the residual
        monkeypatch.setattr(Int8Block, "fuse_residual", False)
        residuals.clear()
        unfused = q(images).tokens
        assert not any(residuals)
        ref = enc(images).tokens
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-5)
    assert (fused - ref).abs().max() > 1e-4  # int8, not the float path
