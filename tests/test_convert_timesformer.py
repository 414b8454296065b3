import pytest
import torch

from encoders import video_encoder_from_hf_timesformer

transformers = pytest.importorskip("transformers")


def _hf_model(attention_type: str, **kw):
    cfg = transformers.TimesformerConfig(
        image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, attention_type=attention_type, **kw,
    )
    torch.manual_seed(0)
    model = transformers.TimesformerModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits some tensors (time embeddings); make every weight count
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_tokens_equal_last_hidden_state(attention_type):
    hf = _hf_model(attention_type)
    enc = video_encoder_from_hf_timesformer(hf).eval()
    assert enc.cfg.norm_eps == hf.config.layer_norm_eps and enc.cfg.cls_mode == "shared"
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=clips).last_hidden_state
        out = enc(clips)
    assert out.tokens.shape == expected.shape == (2, 1 + 16 * 4, 64)
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=0)


def test_qkv_without_bias_and_other_eps():
    hf = _hf_model("divided_space_time", qkv_bias=False, layer_norm_eps=1e-5)
    enc = video_encoder_from_hf_timesformer(hf).eval()
    assert enc.blocks[0].attn.qkv.bias is None
    clips = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(clips).tokens, hf(pixel_values=clips).last_hidden_state, atol=1e-5, rtol=0)


def test_space_only_maps_to_per_frame_rows():
    hf = _hf_model("space_only")
    enc = video_encoder_from_hf_timesformer(hf).eval()
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=clips).last_hidden_state.reshape(2, 4, 17, 64)  # frames as batch rows
        out = enc(clips)
    torch.testing.assert_close(out.tokens[:, :4], expected[:, :, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_tokens, expected[:, :, 1:].permute(0, 2, 1, 3).reshape(2, 64, 64), atol=1e-5, rtol=0)


def test_rejects_unsupported_activation_and_model():
    from encoders.convert import hf_timesformer_config

    cfg = transformers.TimesformerConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="mish"):
        hf_timesformer_config(cfg)
    with pytest.raises(TypeError, match="Linear"):
        video_encoder_from_hf_timesformer(torch.nn.Linear(2, 2))
