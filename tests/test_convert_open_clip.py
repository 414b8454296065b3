import pytest
import torch

from encoders import image_encoder_from_open_clip
from encoders.convert import OPEN_CLIP_RULES, load_strict, rename_keys

open_clip = pytest.importorskip("open_clip")


@pytest.mark.parametrize("name,batch", [("ViT-B-32", 2), ("ViT-B-16", 1)])
def test_pooled_equals_encode_image(name, batch):
    torch.manual_seed(0)
    clip = open_clip.create_model(name).eval()  # random init, nothing downloaded
    enc = image_encoder_from_open_clip(clip).eval()
    assert enc.cfg.patch_bias is False and enc.cfg.pre_norm and enc.cfg.norm_eps == 1e-5 and enc.cfg.act == "gelu"
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        expected = clip.encode_image(x)
        out = enc(x)
    assert out.pooled.shape == expected.shape == (batch, 512)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=0)
    assert out.active_head_ratio is None
    with torch.no_grad():
        pooled_only = enc.encode(x)  # the class-token-only last block
    torch.testing.assert_close(pooled_only, expected, atol=1e-5, rtol=0)
    # the encoder owns copies: changing the source leaves it alone
    with torch.no_grad():
        clip.visual.proj.zero_()
    assert enc.head.weight.abs().sum() > 0


def test_quickgelu_tiny_tower():
    torch.manual_seed(0)
    from open_clip.transformer import QuickGELU, VisionTransformer

    visual = VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=24,
        act_layer=QuickGELU, ls_init_value=0.3,
    ).eval()
    with torch.no_grad():
        for p in visual.parameters():
            p.normal_(0, 0.1)
    enc = image_encoder_from_open_clip(visual).eval()
    assert enc.cfg.act == "quick_gelu" and enc.cfg.ls_init is not None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).pooled, visual(x), atol=1e-5, rtol=0)


def test_strict_loading_names_bad_keys():
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=4, mlp_ratio=2.0, output_dim=8)
    enc = image_encoder_from_open_clip(visual)
    state = rename_keys(dict(visual.state_dict()), OPEN_CLIP_RULES)
    state["head.weight"] = state.pop("proj").t()
    state["extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\) \['norm.bias'\].*unexpected keys \(1\) \['extra.weight'\]"):
        load_strict(enc, state)


def test_rejects_non_vit():
    with pytest.raises(TypeError, match="Linear"):
        image_encoder_from_open_clip(torch.nn.Linear(2, 2))
