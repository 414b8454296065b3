"""ERNIE 4.5 VL's variable-resolution resampler: exact against transformers, and as an aligner."""
from __future__ import annotations

import pytest
import torch

import ernie_vl
from ernie_vl.heads import ErnieResamplerProjector, VariableResolutionResampler

vl_mod = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import Ernie4_5_VLMoeConfig  # noqa: E402


def _hf_resampler(in_dim: int = 8, out_dim: int = 12, seed: int = 0):
    cfg = Ernie4_5_VLMoeConfig(vision_config=dict(hidden_size=in_dim, depth=1, num_heads=2, intermediate_size=16,
                                                  rms_norm_eps=1e-5),
                               text_config=dict(hidden_size=out_dim, moe_intermediate_size=[8, 8], rms_norm_eps=1e-6))
    module = vl_mod.Ernie4_5_VLMoeVariableResolutionResamplerModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # every parameter drawn (norm weights and biases too)
            norm_weight = name.endswith("weight") and ("ln" in name or "after_norm" in name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if norm_weight else 0.0))
    return module


@pytest.mark.parametrize("grid", [[[1, 4, 6]], [[4, 2, 4]], [[1, 2, 2], [2, 4, 4], [1, 6, 2], [6, 2, 2]]])
def test_from_ernie45_matches_transformers_for_images_and_videos(grid):
    hf = _hf_resampler()
    ours = VariableResolutionResampler.from_ernie45(hf).eval()
    assert ours.norm.eps == 1e-6 and ours.spatial_mlp.norm.eps == 1e-5
    grid_thw = torch.tensor(grid)
    x = torch.randn(int(grid_thw.prod(-1).sum()), 8)
    with torch.no_grad():
        expected = hf(x, grid_thw)
        got = ours(x, grid_thw)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.shape[0] == sum(max(t // 2, 1) * h * w // 4 for t, h, w in grid)


def _packed(patches: torch.Tensor) -> torch.Tensor:
    """(T, gh, gw, C) -> transformers' packed order: frame, 2x2 block row-major, patch in block."""
    t, gh, gw, c = patches.shape
    return patches.view(t, gh // 2, 2, gw // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, c)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_aligner_on_encoder_layout_equals_the_packed_resampler(frames):
    torch.manual_seed(0)
    proj = ErnieResamplerProjector(8, 12).eval()
    b, gh, gw, prefix = 2, 4, 6, 1
    grid_patches = torch.randn(b, frames, gh, gw, 8)
    if frames == 1:  # image tokens: row-major patches
        flat = grid_patches.reshape(b, gh * gw, 8)
    else:  # video tokens: patch position major, frame minor
        flat = grid_patches.permute(0, 2, 3, 1, 4).reshape(b, gh * gw * frames, 8)
    cls = torch.randn(b, prefix, 8)
    with torch.no_grad():
        out, num_prefix = proj(torch.cat([cls, flat], 1), prefix, grid=(gh, gw), num_frames=frames)
        for i in range(b):
            ref = proj.resampler(_packed(grid_patches[i]), torch.tensor([[frames, gh, gw]]))
            torch.testing.assert_close(out[i, prefix:], ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[:, :prefix], proj.prefix_proj(cls))
    assert num_prefix == prefix and out.shape == (b, prefix + max(frames // 2, 1) * gh * gw // 4, 12)


def test_bad_layouts_fail_with_sizes():
    proj = ErnieResamplerProjector(8, 12)
    with pytest.raises(ValueError, match="patch grid 3x4 is not divisible by spatial_merge=2"):
        proj(torch.randn(1, 13, 8), 1, grid=(3, 4), num_frames=1)
    with pytest.raises(ValueError, match="multiple of temporal_merge=2 frames, got 3"):
        proj(torch.randn(1, 1 + 3 * 16, 8), 1, grid=(4, 4), num_frames=3)
    with pytest.raises(ValueError, match=r"needs all 1x4x4 patch tokens after 1 prefix tokens, got 1 tokens"):
        proj(torch.randn(1, 1, 8), 1, grid=(4, 4), num_frames=1)
    with pytest.raises(ValueError, match=r"grid_thw \[\[1, 4, 4\]\] gives 16 patches"):
        proj.resampler(torch.randn(15, 8), torch.tensor([[1, 4, 4]]))


def test_model_with_resampler_ernie45_aligner_encodes_and_trains():
    model = ernie_vl.create_model("test", image_projector={"kind": "resampler_ernie45"},
                                  video_projector={"kind": "resampler_ernie45"})
    images, clips = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 3, 32, 32)
    img, vid = model.encode_image(images), model.encode_video(clips)
    assert img.shape == (2, 32) and vid.shape == (2, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    feats = model.video_features(clips)
    feats.embeds.square().sum().backward()
    for name in ("spatial_mlp.fc1.weight", "temporal_mlp.fc1.weight", "proj.weight", "norm.weight"):
        grad = dict(model.video_projector.resampler.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
