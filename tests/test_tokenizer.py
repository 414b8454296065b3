"""ernie_vl.get_tokenizer(preset_or_model) and ErnieVL.get_tokenizer(): the tokenizer at that model's context;
encode_text takes longer padded input whose content fits (checked after the padding is trimmed)."""
from __future__ import annotations

import pytest
import torch

import ernie_vl
from encoders.text import get_tokenizer as clip_tokenizer

CAPTIONS = ["a red circle", "two small blue squares on the left"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ernie_vl.create_model("test").eval()


@pytest.mark.parametrize("name", ernie_vl.list_models())
def test_preset_name_gives_that_presets_tokenizer(name):
    cfg = ernie_vl.load_config(name)
    ids = ernie_vl.get_tokenizer(name)(CAPTIONS)
    assert ids.shape == (2, cfg.text.context_length) and ids.dtype == torch.int64
    assert int(ids.max()) < cfg.text.vocab_size


def test_model_config_folder_and_method_agree(model, tmp_path):
    expected = model.tokenizer(CAPTIONS)
    model.save_pretrained(str(tmp_path / "m"))
    for source in (model, model.cfg, "test", str(tmp_path / "m"), tmp_path / "m"):
        assert torch.equal(ernie_vl.get_tokenizer(source)(CAPTIONS), expected), source
    assert torch.equal(model.get_tokenizer()(CAPTIONS), expected)
    assert expected.shape == (2, 16)


def test_no_argument_is_clip_bpe_at_77_and_an_int_sets_the_length():
    assert torch.equal(ernie_vl.get_tokenizer()(CAPTIONS), clip_tokenizer(77)(CAPTIONS))
    assert ernie_vl.get_tokenizer(32)(CAPTIONS).shape == (2, 32)
    assert ernie_vl.get_tokenizer(context_length=20)(CAPTIONS).shape == (2, 20)


def test_context_length_may_shorten_a_models_context_only():
    assert ernie_vl.get_tokenizer("tiny", context_length=8)(CAPTIONS).shape == (2, 8)
    with pytest.raises(ValueError, match=r"context_length must be an int in \[1, 32\]"):
        ernie_vl.get_tokenizer("tiny", context_length=64)


def test_bad_sources_are_named():
    with pytest.raises(ValueError, match="unknown model 'huge': not a preset .*test, tiny"):
        ernie_vl.get_tokenizer("huge")
    with pytest.raises(TypeError, match="got float"):
        ernie_vl.get_tokenizer(3.5)


def test_encode_text_takes_longer_padded_input_whose_content_fits(model):
    short = model.tokenizer(CAPTIONS)  # (2, 16), the model's own context
    padded = torch.cat([short, torch.zeros(2, 61, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(short), atol=0, rtol=0)
    too_long = torch.cat([short, torch.ones(2, 4, dtype=torch.long)], dim=1)  # content past the context
    with pytest.raises(ValueError, match="holds 20 tokens .*more than this model's context_length 16"):
        model.encode_text(too_long)


def test_clip_77_token_input_works_on_a_32_token_preset():
    tiny = ernie_vl.create_model("tiny").eval()  # CLIP's vocabulary, context 32
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text(clip_tokenizer(77)(CAPTIONS)),
                                   tiny.encode_text(tiny.get_tokenizer()(CAPTIONS)), atol=0, rtol=0)
