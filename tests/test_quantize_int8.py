"""int8 quantization: every linear quantized, embeddings close to fp32, size, save / load."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ernie_vl
from ernie_vl.modality import IMAGE
from ernie_vl.quantize import (SCHEMES, Int8Linear, Int8Mlp, Int8MoEFeedForward, Int8PatchEmbed, available_int8_kernels,
                               int8_kernel, int8_kernel_choice, quantize_activation, quantize_weight,
                               probe_int8_kernels, probed_int8_kernels, set_int8_kernel, set_int8_probe,
                               state_dict_bytes, time_int8_kernel)
from ernie_vl.int8_engines import PROBE_REPEATS
from encoders.blocks import Mlp
from ernie_vl.moe.layer import MoEFeedForward
from tests._model_helpers import make_batch
from tests._quantize_helpers import CallCounter, assert_same_backbone_output

KERNELS = available_int8_kernels()


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


def test_activation_quantization_is_7_bit_with_exact_zero() -> None:
    x = torch.tensor([[-1.5, 0.0, 0.25], [3.0, -0.75, 1.0]])
    q, scale, zero_point = quantize_activation(x)
    assert q.dtype == torch.uint8 and int(q.min()) == 0 and int(q.max()) == 127
    assert scale == pytest.approx(4.5 / 127) and zero_point == round(1.5 / scale)
    dequant = (q.float() - zero_point) * scale
    assert dequant[0, 1] == 0.0  # zero is exactly representable
    assert torch.all((dequant - x).abs() <= scale / 2 + 1e-6)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu", "quick_gelu"])
def test_each_kernel_matches_float_with_its_activation(kernel, activation) -> None:
    from ernie_vl.moe.activation import activation_fn

    torch.manual_seed(0)
    linear = nn.Linear(96, 300)
    x = torch.randn(3, 100, 96)
    layer = Int8Linear.from_linear(linear)
    y = layer(x, activation)
    ref = F.linear(x, layer.dequantized_weight(), linear.bias)
    if activation is not None:
        ref = activation_fn(activation)(ref)
    assert y.shape == ref.shape
    # 7-bit activations: error within a few steps of the input scale times the row norms
    step = (x.max() - x.min()).item() / 127
    bound = step * layer.dequantized_weight().abs().sum(dim=1).max().item() / 4
    assert (y - ref).abs().max().item() < bound
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.999


def test_kernels_agree_and_a_forced_kernel_is_used() -> None:
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 48))
    x = torch.randn(300, 64)
    outs = {}
    for name in KERNELS:
        previous = set_int8_kernel(name)
        outs[name] = layer(x)
        assert int8_kernel(5) == name and int8_kernel_choice() == name
        set_int8_kernel(previous)
    for y in outs.values():
        torch.testing.assert_close(y, outs[KERNELS[-1]], atol=1e-4, rtol=1e-4)
    assert int8_kernel_choice() == "auto"
    with pytest.raises(ValueError, match="unknown or unavailable int8 kernel 'avx'"):
        set_int8_kernel("avx")


@pytest.mark.skipif(len(KERNELS) < 2, reason="needs both int8 kernels")
def test_auto_probes_each_shape_once_and_keeps_the_faster() -> None:
    calls = []

    def fake_probe(kernel, rows, k, n, activation):  # oneDNN faster for wide outputs, fbgemm for the others
        calls.append((kernel, rows, k, n, activation))
        return (1.0 if kernel == "onednn" else 2.0) if n >= 96 else (3.0 if kernel == "onednn" else 2.0)

    per_probe = 2 * PROBE_REPEATS  # interleaved samples of both kernels
    previous = set_int8_probe(fake_probe)
    try:
        assert int8_kernel(400, 64, 128) == "onednn" and int8_kernel(400, 64, 48) == "fbgemm"
        assert len(calls) == 2 * per_probe
        assert int8_kernel(400, 64, 128) == "onednn" and len(calls) == 2 * per_probe  # cached
        assert int8_kernel(None) == "fbgemm" and len(calls) == 2 * per_probe  # varying rows: no probe
        assert int8_kernel(400, 64, 128, "gelu") == "onednn" and len(calls) == 3 * per_probe  # fused GELU: own key
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            int8_kernel(400, 64, 128)
            assert len(calls) == 4 * per_probe  # another thread count is another shape
        finally:
            torch.set_num_threads(threads)
        assert probed_int8_kernels()[(400, 64, 128, threads, None)] == "onednn"
        # a layer asks with its own shape
        torch.manual_seed(0)
        wide, narrow = Int8Linear.from_linear(nn.Linear(64, 128)), Int8Linear.from_linear(nn.Linear(64, 48))
        assert wide.packed(400, (64, 128))[1] == "onednn" and narrow.packed(400, (64, 48))[1] == "fbgemm"
        x = torch.randn(400, 64)
        wide(x), narrow(x)
        assert set(wide._packed) == {"onednn"} and set(narrow._packed) == {"fbgemm"}
        forced = set_int8_kernel("fbgemm")
        assert int8_kernel(400, 64, 128) == "fbgemm"
        set_int8_kernel(forced)
    finally:
        set_int8_probe(previous)
    assert probed_int8_kernels() == {}


@pytest.mark.skipif(len(KERNELS) < 2, reason="needs both int8 kernels")
def test_the_real_probe_times_both_kernels() -> None:
    previous = set_int8_probe(None)
    try:
        seconds = {k: time_int8_kernel(k, 64, 32, 48, reps=1) for k in KERNELS}
        assert all(0 < s < 10 for s in seconds.values())
        assert probe_int8_kernels(64, 32, 48) in KERNELS
    finally:
        set_int8_probe(previous)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int8_mlp_fuses_the_activation_and_matches_the_unfused_path(kernel) -> None:
    torch.manual_seed(0)
    mlp = Mlp(32, 128, "gelu")
    q = Int8Mlp(mlp)
    x = torch.randn(2, 150, 32)
    unfused = q.fc2(F.gelu(q.fc1(x)))
    torch.testing.assert_close(q(x), unfused, atol=1e-4, rtol=1e-4)
    assert F.cosine_similarity(q(x).flatten(), mlp(x).flatten(), dim=0) > 0.999


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int8_patch_embed_matches_the_convolution(kernel) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 40, 8, 8, bias=True)
    embed = Int8PatchEmbed.from_conv(conv)
    x = torch.randn(2, 3, 48, 64)
    y, ref = embed(x), conv(x)
    assert y.shape == ref.shape == (2, 40, 6, 8)
    tokens, ref_tokens = y.flatten(2).transpose(1, 2), ref.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous()  # the channels-last view flattens for free
    assert F.cosine_similarity(tokens, ref_tokens, dim=-1).min() > 0.999
    with pytest.raises(ValueError, match="multiples of"):
        embed(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match="kernel == stride"):
        Int8PatchEmbed.from_conv(nn.Conv2d(3, 8, 3, 1, padding=1))


def test_patch_embeddings_are_int8(models) -> None:
    _, q = models
    assert isinstance(q.image_encoder.patch_embed, Int8PatchEmbed)
    assert isinstance(q.image_encoder.blocks[0].mlp, Int8Mlp)


def test_closed_gate_shortcut_is_exact_on_the_int8_backbone(models) -> None:
    _, q = models
    x = torch.randn(2, 6, q.backbone.width)
    ids = torch.full((2, 6), IMAGE)
    saved = [b.gate.detach().clone() for b in q.backbone.blocks]
    try:
        with torch.no_grad():
            for b in q.backbone.blocks:
                b.gate[IMAGE] = 0.0
        calls = CallCounter([b.attn for b in q.backbone.blocks] + q.backbone.moe_layers)
        with torch.no_grad():
            fast = q.backbone(x, ids)
        assert calls.calls == 0
        for b in q.backbone.blocks:
            b.skip_closed = False
        with torch.no_grad():
            slow = q.backbone(x, ids)
        assert calls.calls > 0
        assert_same_backbone_output(fast, slow)
    finally:
        with torch.no_grad():
            for b, g in zip(q.backbone.blocks, saved):
                b.gate.copy_(g)
                b.skip_closed = True


def test_checkpoints_of_the_first_scheme_still_load(models, tmp_path) -> None:
    model, _ = models
    old = ernie_vl.quantize_int8(model, scheme=SCHEMES[0])
    assert isinstance(old.image_encoder.patch_embed, nn.Conv2d)
    old.save_pretrained(str(tmp_path / "v1"))
    loaded = ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "v1"))
    assert isinstance(loaded.image_encoder.patch_embed, nn.Conv2d)
    images = make_batch(model, pairs=2, videos=1).images
    with torch.no_grad():
        assert torch.equal(old.encode_image(images), loaded.encode_image(images))
    with pytest.raises(ValueError, match="unknown quantization scheme 'int8-v0'"):
        ernie_vl.quantize_int8(model, scheme="int8-v0")


def test_int8_moe_layers_report_their_backend_like_float_ones(models) -> None:
    """Code that asks (or sets) a model's MoE kernel works on int8 models: ``.backend`` is "int8"."""
    model, q = models
    float_layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and not isinstance(m, Int8MoEFeedForward)]
    int8_layers = [m for m in q.modules() if isinstance(m, Int8MoEFeedForward)]
    assert float_layers and len(int8_layers) == len(float_layers)
    for layer in int8_layers:
        assert layer.backend == "int8"
        counts = [4] * layer.config.num_experts
        assert layer.expert_backend(torch.empty(16, layer.d_model), counts) == f"int8:{layer.experts.packed()[1]}"
        layer.backend = "auto"  # accepted: nothing to choose
        layer.backend = "int8"
        with pytest.raises(ValueError, match="'loop'.*valid here"):
            layer.backend = "loop"
        assert layer.backend == "int8"


def test_head_topk_encoder_runs_int8_and_matches_its_masked_reference() -> None:
    """``forward_selected`` slices float weights; int8 projections must take the whole-head path instead."""
    from encoders.vit import ImageEncoder
    from ernie_vl.quantize import quantize_modules
    from tests._encoders_helpers import randomize_, tiny_image_cfg

    torch.manual_seed(0)
    enc = randomize_(ImageEncoder(tiny_image_cfg(head_gating=True, head_topk=1)), std=0.3).eval()
    q = quantize_modules(copy.deepcopy(enc))
    assert isinstance(q.blocks[0].attn.qkv, Int8Linear)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = enc(x).pooled, q(x).pooled
        assert F.cosine_similarity(ref, out).min() > 0.99
        block = q.blocks[0]
        h = block.norm1(q.norm_pre(torch.cat([q.class_token().expand(3, 1, -1), q.embed_patches(x)[0]], 1)))
        gate = block.gate(h)
        assert gate.keep.sum(1).tolist() == [1, 1, 1]
        torch.testing.assert_close(
            block.attention(h, (4, 4), gate), block.attn(h, head_gate=gate.gate * gate.keep), atol=1e-5, rtol=0
        )
