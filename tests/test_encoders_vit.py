import dataclasses

import pytest
import torch

from encoders import EncoderOutput, ImageEncoder, ImageEncoderConfig
from encoders.windows import window_attention_mask
from tests._encoders_helpers import params_without_grad, randomize_, tiny_image_cfg


def test_output_shapes_and_type():
    enc = ImageEncoder(tiny_image_cfg())
    out = enc(torch.randn(2, 3, 32, 32))
    assert isinstance(out, EncoderOutput)
    assert out.tokens.shape == (2, 17, 32) and out.pooled.shape == (2, 16)
    assert out.grid == (4, 4) and out.num_frames == 1 and out.active_head_ratio is None
    # tokens are after the final norm: zero mean, unit variance per token (norm weight 1, bias 0)
    torch.testing.assert_close(out.tokens.mean(-1), torch.zeros(2, 17), atol=1e-5, rtol=0)
    # pooled is the projected class token
    torch.testing.assert_close(out.pooled, enc.head(out.tokens[:, 0]), atol=1e-6, rtol=0)


def test_avg_pool_and_no_head():
    enc = ImageEncoder(tiny_image_cfg(pool="avg", embed_dim=None))
    out = enc(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.pooled, out.tokens[:, 1:].mean(1), atol=1e-6, rtol=0)


def test_other_resolution_resamples_positions():
    enc = ImageEncoder(tiny_image_cfg())
    out = enc(torch.randn(1, 3, 48, 64))
    assert out.tokens.shape == (1, 1 + 6 * 8, 32) and out.grid == (6, 8)


def test_resampled_positions_follow_the_configured_ones():
    """At the configured size no resampling happens; a 2x upsample keeps the corners' trend."""
    from encoders.pos_embed import resample_pos_embed_2d

    pos = torch.arange(16.0).reshape(16, 1).repeat(1, 4)
    assert resample_pos_embed_2d(pos, (4, 4), (4, 4)) is pos
    up = resample_pos_embed_2d(pos, (4, 4), (8, 8), "nearest")
    torch.testing.assert_close(up.reshape(8, 8, 4)[::2, ::2].reshape(16, 4), pos)


def test_float64_is_cast_and_matches_float32():
    enc = ImageEncoder(tiny_image_cfg())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x.double()).pooled, enc(x).pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "x,err,match",
    [
        (torch.randn(3, 32, 32), ValueError, r"shape \(3, 32, 32\)"),
        (torch.randn(1, 4, 32, 32), ValueError, r"3 channels"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "uint8"),
        (torch.randn(1, 3, 30, 32), ValueError, "30x32"),
        ("image", TypeError, "str"),
    ],
)
def test_bad_input_names_the_value(x, err, match):
    with pytest.raises(err, match=match):
        ImageEncoder(tiny_image_cfg())(x)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(act="mish"), "mish"),
        (dict(attn_impl="flash"), "flash"),
        (dict(pool="max"), "max"),
        (dict(width=30), "30"),
        (dict(local_layers=5), "local_layers"),
        (dict(head_topk=2), "head_gating"),
        (dict(head_gating=True, head_topk=9), "head_topk"),
        (dict(image_size=30), "patch_size"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_image_cfg(**overrides)


def test_config_round_trips_through_dict():
    cfg = tiny_image_cfg(head_gating=True, head_topk=2, local_layers=1, window_size=2)
    assert ImageEncoderConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(TypeError):
        ImageEncoderConfig(**{**dataclasses.asdict(cfg), "bogus": 1})


@pytest.mark.parametrize("topk", [None, 2])
def test_every_parameter_gets_a_gradient(topk):
    cfg = tiny_image_cfg(head_gating=True, head_topk=topk, local_layers=1, window_size=3, pre_norm=True, ls_init=0.5)
    enc = ImageEncoder(cfg)
    randomize_(enc)
    out = enc(torch.randn(2, 3, 32, 32))
    (out.pooled.square().sum() + out.tokens.square().mean()).backward()
    assert params_without_grad(enc) == []


def test_fused_and_eager_encoders_agree():
    cfg = tiny_image_cfg(local_layers=1, window_size=3, head_gating=True, head_topk=3)
    fused = randomize_(ImageEncoder(cfg))
    eager = ImageEncoder(dataclasses.replace(cfg, attn_impl="eager"))
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 40, 32)
    torch.testing.assert_close(fused(x).pooled, eager(x).pooled, atol=1e-5, rtol=0)


def test_gating_at_init_is_exactly_the_plain_vit():
    plain = randomize_(ImageEncoder(tiny_image_cfg()))
    gated = ImageEncoder(tiny_image_cfg(head_gating=True))
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert all(".gate." in k for k in missing) and unexpected == []
    x = torch.randn(2, 3, 32, 32)
    out = gated(x)
    assert torch.equal(out.pooled, plain(x).pooled)
    torch.testing.assert_close(out.active_head_ratio, torch.ones(2))


def test_head_topk_keeps_k_heads_and_matches_masked_reference():
    enc = randomize_(ImageEncoder(tiny_image_cfg(head_gating=True, head_topk=1)), std=0.3)
    x = torch.randn(3, 3, 32, 32)
    out = enc(x)
    torch.testing.assert_close(out.active_head_ratio, torch.full((2,), 0.25))
    # reference: plain attention with the non-top heads' gates set to zero
    block = enc.blocks[0]
    h = block.norm1(enc.norm_pre(torch.cat([enc.class_token().expand(3, 1, -1), enc.embed_patches(x)[0]], 1)))
    gate = block.gate(h)
    assert gate.keep.sum(1).tolist() == [1, 1, 1]
    assert torch.equal(gate.keep, gate.gate == gate.gate.max(1, keepdim=True).values)
    torch.testing.assert_close(
        block.attention(h, (4, 4), gate), block.attn(h, head_gate=gate.gate * gate.keep), atol=1e-5, rtol=0
    )


def test_threshold_makes_the_active_share_input_dependent():
    enc = ImageEncoder(tiny_image_cfg(head_gating=True, gate_threshold=1.0, depth=1))
    gate = enc.blocks[0].gate
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[:, 0] = torch.tensor([4.0, 2.0, -2.0, -4.0])  # heads respond to channel 0
    dense = gate(torch.full((1, 5, 32), 1.0)).active_ratio
    sparse = gate(torch.full((1, 5, 32), -1.0)).active_ratio
    assert dense.item() == 0.5 and sparse.item() == 0.5
    mixed = gate(torch.cat([torch.full((1, 5, 32), 1.0), torch.zeros(1, 5, 32)], 0))
    assert mixed.keep.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_local_layers_attend_within_windows():
    """A local block equals global attention under the dense window mask (grid 5x5, window 2: padded)."""
    cfg = tiny_image_cfg(image_size=40, local_layers=1, window_size=2, depth=1)
    enc = randomize_(ImageEncoder(cfg))
    x = torch.randn(1, 3, 40, 40)
    block = enc.blocks[0]
    tokens = enc.norm_pre(torch.cat([enc.class_token().expand(1, 1, -1), enc.embed_patches(x)[0]], 1))
    h = block.norm1(tokens)
    expected = block.attn(h, window_attention_mask((5, 5), 2))
    torch.testing.assert_close(block.attention(h, (5, 5)), expected, atol=1e-5, rtol=0)
    # and a far-away patch cannot change a patch's local-layer output
    y0 = block(tokens, (5, 5))[0]
    tokens2 = tokens.clone()
    tokens2[:, -1] += 3.0 * torch.randn(32)  # patch (4, 4); not a constant (LayerNorm removes those)
    y1 = block(tokens2, (5, 5))[0]
    torch.testing.assert_close(y0[:, 1], y1[:, 1], atol=1e-5, rtol=0)  # patch (0, 0)
    assert not torch.allclose(y0[:, 0], y1[:, 0])  # the class token sees everything


def test_topk_with_windows_matches_masked_window_reference():
    from encoders.windows import window_attention

    enc = randomize_(ImageEncoder(tiny_image_cfg(image_size=40, head_gating=True, head_topk=2, local_layers=1, window_size=2)))
    block = enc.blocks[0]
    h = block.norm1(torch.randn(3, 26, 32))
    gate = block.gate(h)
    q, k, v = block.attn.split_heads(h)
    expected = block.attn.merge_heads(window_attention(q, k, v, (5, 5), 2, block.attn.attend), gate.gate * gate.keep)
    torch.testing.assert_close(block.attention(h, (5, 5), gate), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"head_gating": True, "head_topk": 2}, {"local_layers": 2, "window_size": 3}, {"ls_init": 0.5}],
)
def test_prefix_only_gives_the_class_token_of_the_full_pass(overrides):
    torch.manual_seed(0)
    enc = randomize_(ImageEncoder(tiny_image_cfg(**overrides)), std=0.3).eval()
    x = torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        full, short = enc(x), enc(x, prefix_only=True)
    assert short.tokens.shape == (3, 1, 32) and short.num_prefix_tokens == 1 and short.grid == full.grid
    torch.testing.assert_close(short.tokens, full.tokens[:, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short.pooled, full.pooled, atol=1e-5, rtol=1e-5)
    if full.active_head_ratio is not None:
        torch.testing.assert_close(short.active_head_ratio, full.active_head_ratio)
    assert not torch.allclose(full.tokens[:, :1], full.tokens[:, 1:2])  # the class token is not a patch


def test_prefix_only_needs_class_token_pooling():
    enc = ImageEncoder(tiny_image_cfg(pool="avg"))
    with pytest.raises(ValueError, match="prefix_only needs pool='cls'"):
        enc(torch.randn(1, 3, 32, 32), prefix_only=True)


def test_sincos_position_init():
    """pos_init="sincos": the 2-D sine-cosine table, at the strength of the patch embeddings; unknown names refused."""
    import math

    from encoders.pos_embed import sincos_pos_embed_2d
    from encoders.video_vit import VideoEncoder, VideoEncoderConfig

    table = sincos_pos_embed_2d((2, 3), 8)  # quarter = 2 frequencies: 1 and 1/100
    row, col = 1, 2  # patch 5 of the 2 x 3 grid
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(table[row * 3 + col], torch.tensor(expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d((2, 2), 6)

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_image_cfg(), pos_init="sincos")
    enc = ImageEncoder(cfg)
    pos = enc.pos_embed.detach()
    assert float(pos[0].abs().max()) == 0.0  # the class token's position starts at zero
    grid = cfg.grid_size
    direction = torch.nn.functional.normalize(pos[1:], dim=1) @ torch.nn.functional.normalize(
        sincos_pos_embed_2d(grid, cfg.width), dim=1).t()
    torch.testing.assert_close(direction.diagonal(), torch.ones(grid[0] * grid[1]), atol=1e-5, rtol=0)
    with torch.no_grad():
        patches = enc.patch_embed(torch.randn(64, 3, *cfg.image_size)).flatten(2)
    assert float(pos[1:].std()) == pytest.approx(float(patches.std()), rel=0.15)
    # a tubelet (Conv3d) video encoder scales its table to its own, wider patch embedding
    video = VideoEncoder(VideoEncoderConfig(image_size=16, patch_size=8, width=32, depth=1, num_heads=2,
                                            num_frames=4, tubelet_size=2, pos_init="sincos"))
    fan_in = video.patch_embed.weight[0].numel()
    strength = float(video.patch_embed.weight.detach().std()) * fan_in ** 0.5
    assert float(video.pos_embed[1:].detach().std()) == pytest.approx(strength, rel=1e-4)
    with pytest.raises(ValueError, match="pos_init"):
        ImageEncoderConfig(pos_init="rope")


def test_sincos_models_build_on_the_meta_device_and_count_parameters():
    """create_model counts parameters on the meta device first; a sincos position init must not read values there."""
    import ernie_vl
    from ernie_vl.limits import estimate_params

    base = ernie_vl.create_model("test")
    cfg = dataclasses.replace(base.cfg, image_encoder=dataclasses.replace(base.cfg.image_encoder, pos_init="sincos"))
    assert estimate_params(cfg) == sum(p.numel() for p in base.parameters())
    model = ernie_vl.ErnieVL(cfg)
    assert float(model.image_encoder.pos_embed[1:].detach().std()) > 0
