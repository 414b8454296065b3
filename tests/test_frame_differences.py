"""The one-pass frame differences (``encoders.video_stem.frame_differences``) that feed the video conv
tokenizer: the same numbers as the straightforward two-concatenation computation, in either memory
layout, forward and backward, and the same encoder outputs, gradients, checkpoints and int8 outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import encoders.video_vit as video_vit
from encoders.video_stem import frame_differences
from encoders.video_vit import VideoEncoder, VideoEncoderConfig

CL = torch.channels_last_3d


def reference_frame_differences(x: torch.Tensor, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """The frames, then ``x[t] - x[t-1]`` (zeros at t = 0), by two concatenations and then the layout the
    encoder asks for: how the tokenizer's input was computed before the one-pass version."""
    diff = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)
    return torch.cat([x, diff], dim=1)


@pytest.mark.parametrize("shape", [(2, 3, 1, 5, 7), (2, 3, 2, 4, 4), (1, 3, 5, 9, 6), (3, 2, 8, 8, 8)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_one_pass_equals_the_concatenations_exactly(shape, memory_format):
    torch.manual_seed(0)
    b, c, t, h, w = shape
    clips = torch.randn(b, t, c, h, w)
    x = clips.transpose(1, 2)  # (B, C, T, H, W) as the encoder sees it: a strided view
    out = frame_differences(x, memory_format)
    assert out.shape == (b, 2 * c, t, h, w) and out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, reference_frame_differences(x))  # bit for bit: one subtraction per element either way
    assert torch.count_nonzero(out[:, c:, 0]) == 0  # the first frame has no predecessor
    assert torch.equal(frame_differences(x.contiguous(), memory_format), out)


def test_default_layout_is_contiguous():
    out = frame_differences(torch.randn(1, 3, 4, 4, 4).transpose(1, 2))
    assert out.is_contiguous()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL])
def test_gradients_reach_the_pixels_as_through_the_concatenations(memory_format):
    torch.manual_seed(0)
    clips = torch.randn(2, 5, 3, 6, 6, requires_grad=True)
    weights = torch.randn(2, 6, 5, 6, 6)
    (frame_differences(clips.transpose(1, 2), memory_format) * weights).sum().backward()
    ours = clips.grad.clone()
    clips.grad = None
    (reference_frame_differences(clips.transpose(1, 2)) * weights).sum().backward()
    torch.testing.assert_close(ours, clips.grad, rtol=0, atol=1e-6)  # the same terms, summed in another order
    # by hand: pixel t gets its own weight, plus its difference's (none at t = 0), minus the next difference's
    w = weights.transpose(1, 2)  # (B, T, 6, H, W)
    expected = w[:, :, :3].clone()
    expected[:, 1:] += w[:, 1:, 3:]
    expected[:, :-1] -= w[:, 1:, 3:]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


SMALL = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _encoder(image_size: int, frames: int, tubelet: int, stem: dict) -> VideoEncoder:
    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**SMALL, image_size=image_size, num_frames=frames, tubelet_size=tubelet,
                                          conv_stem=stem))
    for m in enc.modules():  # non-trivial batch norms, so a wrong input shows in every output
        if isinstance(m, nn.BatchNorm3d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    return enc


def _train_step(enc: VideoEncoder, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    enc.train().zero_grad(set_to_none=True)
    out = enc(clips)
    (out.pooled.square().sum() + out.tokens.mean()).backward()
    return out.tokens.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("image_size, frames, tubelet, stem", [
    (32, 8, 4, {"channels": [4, 8, 8], "frame_diff": True}),  # tiny's strides: time stride in the last blocks
    (24, 5, 1, {"channels": [4, 6], "frame_diff": True}),  # odd frame count, odd 3x3 token grid
    (24, 3, 3, {"channels": [5], "frame_diff": True, "time_kernel": 5}),
    (16, 4, 2, {"channels": [4, 4], "frame_diff": True, "time_kernel": 1}),
])
def test_training_step_of_the_encoder_equals_the_reference_input(monkeypatch, image_size, frames, tubelet, stem):
    """Train-mode forward (batch statistics) and the gradients of every parameter, stem weights included, are
    the numbers the two-concatenation input gives: the conv tokenizer reads the same tensor, bit for bit."""
    clips = torch.rand(3, frames, 3, image_size, image_size)
    enc = _encoder(image_size, frames, tubelet, stem)
    tokens, grads = _train_step(enc, clips)
    monkeypatch.setattr(video_vit, "frame_differences", reference_frame_differences)
    ref_tokens, ref_grads = _train_step(_encoder(image_size, frames, tubelet, stem), clips)
    assert torch.equal(tokens, ref_tokens)
    assert grads.keys() == ref_grads.keys() and "stem.0.weight" in grads
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_checkpoints_keep_their_keys_and_outputs(tmp_path, monkeypatch):
    """The stem's parameters and buffers keep their names and shapes, so a checkpoint written with the
    two-concatenation input loads and gives the same outputs, float and int8."""
    import ernie_vl
    from ernie_vl.int8_engines import available_int8_kernels, set_int8_kernel
    from ernie_vl.quantize import quantize_int8

    if not available_int8_kernels():
        pytest.skip("this PyTorch build has no int8 GEMM engine")
    previous = set_int8_kernel(available_int8_kernels()[-1])  # one engine: no per-shape timing probe
    try:
        check_checkpoint_keys_and_outputs(ernie_vl, quantize_int8, tmp_path, monkeypatch)
    finally:
        set_int8_kernel(previous)


def check_checkpoint_keys_and_outputs(ernie_vl, quantize_int8, tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = ernie_vl.create_model("test", class_names=["a", "b", "c"],
                                  video_encoder={"conv_stem": {"channels": [4, 8], "frame_diff": True}}).eval()
    stem_keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("video_encoder.stem.")}
    assert stem_keys["video_encoder.stem.0.weight"] == (4, 6, 3, 3, 3)  # pixels and differences, as saved
    assert len(stem_keys) == 2 * 6  # per block: conv weight; norm weight, bias, running mean, var, count
    clips = torch.rand(2, 8, 3, 32, 32)
    int8 = quantize_int8(model)
    with torch.no_grad():
        ours = model.encode_video(clips), model.classify_video(clips), int8.encode_video(clips)
        with monkeypatch.context() as m:
            m.setattr(video_vit, "frame_differences", reference_frame_differences)
            model.save_pretrained(tmp_path)
            reference = model.encode_video(clips), model.classify_video(clips), int8.encode_video(clips)
        loaded = ernie_vl.ErnieVL.from_pretrained(tmp_path).eval()
        assert {k: tuple(v.shape) for k, v in loaded.state_dict().items() if k.startswith("video_encoder.stem.")} \
            == stem_keys
        reloaded = loaded.encode_video(clips), loaded.classify_video(clips), quantize_int8(loaded).encode_video(clips)
    for a, b, c in zip(ours, reference, reloaded):
        assert torch.equal(a, b) and torch.equal(a, c)
