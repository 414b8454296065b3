import pytest
import torch

from encoders import image_encoder_from_timm

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name,batch", [("vit_tiny_patch16_224", 2), ("vit_base_patch32_224", 1)])
def test_tokens_equal_forward_features(name, batch):
    torch.manual_seed(0)
    # pretrained=False; timm's own (slow) init skipped, every tensor filled with noise instead
    vit = timm.create_model(name, pretrained=False, weight_init="skip").eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.02)
    enc = image_encoder_from_timm(vit).eval()
    assert enc.cfg.patch_bias and not enc.cfg.pre_norm and enc.cfg.norm_eps == 1e-6 and enc.head is None
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        expected = vit.forward_features(x)
        out = enc(x)
    assert out.tokens.shape == expected.shape
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled, expected[:, 0], atol=1e-5, rtol=0)


def test_small_custom_timm_vit_with_layer_scale():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, init_values=0.2, num_classes=5).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    enc = image_encoder_from_timm(vit).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x).tokens, vit.forward_features(x), atol=1e-5, rtol=0)


def test_rejects_unsupported_timm_variant():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, reg_tokens=4)
    with pytest.raises(ValueError, match="num_prefix_tokens=5"):
        image_encoder_from_timm(vit)
