"""Presets: names, strict configs, overrides, parameter counts (base/large on the meta device)."""
from __future__ import annotations

import pytest
import torch

import ernie_vl
from ernie_vl.config import ErnieVLConfig
from ernie_vl.presets import preset_dict


def _count(name: str) -> tuple[int, ernie_vl.ErnieVL]:
    with torch.device("meta"):
        model = ernie_vl.create_model(name)
    return sum(p.numel() for p in model.parameters()), model


def test_list_models_names_the_presets_smallest_first() -> None:
    assert ernie_vl.list_models() == ["test", "tiny", "ernie45-tiny", "base", "large"]


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'huge'; valid: test, tiny, ernie45-tiny, base, large"):
        ernie_vl.create_model("huge")


@pytest.mark.parametrize("name", ernie_vl.list_models())
def test_preset_round_trips_through_a_dict(name: str) -> None:
    cfg = ernie_vl.load_config(name)
    assert ErnieVLConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.name == name


@pytest.mark.parametrize("name", ernie_vl.list_models())
def test_preset_builds_with_its_own_id_context_and_classes(name: str) -> None:
    count, model = _count(name)  # on the meta device: shapes only
    cfg = ernie_vl.load_config(name)
    assert count > 0 and model.model_id == f"ernie-vl:{name}"
    assert model.text_embedding.positional_embedding.shape[0] == cfg.text.context_length
    assert model.classifier.out_features == cfg.num_classes
    assert model.tokenizer(["a photo of a dog"]).shape == (1, cfg.text.context_length)


def test_unknown_keys_fail_and_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]; valid keys: \[.*'backbone'"):
        ErnieVLConfig.from_dict({**preset_dict("test"), "colour": "red"})
    with pytest.raises(ValueError, match=r"backbone.moe: unknown key\(s\) \['experts'\]"):
        ernie_vl.load_config("test", backbone={"moe": {"experts": 3}})
    with pytest.raises(ValueError, match="unknown projector kind 'qformer'; valid: linear, mlp, resampler"):
        ernie_vl.load_config("test", video_projector={"kind": "qformer"})


def test_overrides_merge_into_sections() -> None:
    plain = ernie_vl.load_config("tiny")
    cfg = ernie_vl.load_config("tiny", backbone={"moe": {"num_experts": 8}}, num_classes=7)
    assert cfg.backbone.moe.num_experts == 8 and cfg.num_classes == 7
    # everything not overridden keeps the preset's value
    assert cfg.backbone.moe.top_k == plain.backbone.moe.top_k and cfg.backbone.width == plain.backbone.width
    assert cfg.image_encoder == plain.image_encoder
    assert ernie_vl.load_config("tiny", class_names=["x", "y"]).num_classes == 2


def test_parameter_counts_match_the_tiers() -> None:
    counts = {name: _count(name)[0] for name in ernie_vl.list_models()}
    assert counts["test"] < 1_000_000
    assert counts["test"] < counts["tiny"] < counts["base"] < counts["large"]
    _, base = _count("base")
    assert base.cfg.image_encoder.patch_size == (16, 16) and base.cfg.image_encoder.width == 768
    assert base.cfg.backbone.depth == 12 and base.cfg.backbone.width == 512
    assert base.cfg.backbone.moe.num_experts == 8 and base.cfg.backbone.moe.top_k == 2
    # the backbone of base holds 6 MoE layers of 8 experts with 2 * 512 * 2048 weights each
    moe = [b.mlp for b in base.backbone.blocks if b.is_moe]
    assert len(moe) == 6
    assert sum(p.numel() for p in moe[0].experts.parameters()) == 8 * (2 * 512 * 2048 + 2048 + 512)
