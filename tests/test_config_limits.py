"""Configs are validated before allocation: types, bounds in one place, a parameter budget with the number."""
from __future__ import annotations

import json

import pytest
import torch

import ernie_vl
from ernie_vl import limits
from ernie_vl.config import ErnieVLConfig
from ernie_vl.moe import MoEConfig
from ernie_vl.presets import list_models, load_config


@pytest.fixture
def no_building(monkeypatch):
    """Fail the test if a model part is built with memory (the meta-device count is allowed): the refusal comes first."""
    from ernie_vl import model as model_module

    def guard(build):
        def guarded(*args, **kwargs):
            if torch.get_default_device().type != "meta":
                raise AssertionError("a model part was built before the config was refused")
            return build(*args, **kwargs)
        return guarded

    monkeypatch.setattr(model_module, "ImageEncoder", guard(model_module.ImageEncoder))
    monkeypatch.setattr(model_module.SharedBackbone, "from_config", guard(model_module.SharedBackbone.from_config))


ABSURD = [
    (dict(backbone={"moe": {"num_experts": 10**9}}), ValueError, r"backbone\.moe\.num_experts = 1000000000 is out of range"),
    (dict(image_encoder={"width": 10**7}), ValueError, r"image_encoder\.width = 10000000 is out of range.*16384"),
    (dict(backbone={"depth": 10**6}), ValueError, r"backbone\.depth = 1000000 is out of range.*256"),
    (dict(backbone={"moe": {"num_experts": 4.0}}), TypeError, r"backbone\.moe\.num_experts must be int, got float 4\.0"),
    (dict(video_encoder={"depth": True}), TypeError, r"video_encoder\.depth must be int, got bool"),
    (dict(text={"context_length": "77"}), TypeError, r"text\.context_length must be int, got str"),
    (dict(head={"embed_dim": 10**6}), ValueError, r"head\.embed_dim = 1000000"),
    (dict(backbone={"num_heads": 5}), ValueError, r"backbone\.num_heads = 5 does not divide backbone\.width = 32"),
    (dict(backbone={"moe": {"top_k": 8}}), ValueError, r"top_k"),
    (dict(image_encoder={"image_size": 4096, "patch_size": 8}), ValueError, r"262144 patches"),
    (dict(loss={"init_logit_scale": float("nan")}), ValueError, r"loss\.init_logit_scale"),
    (dict(num_classes=10**8), ValueError, r"num_classes = 100000000"),
    (dict(backbone={"moe": {"routing": "groups", "group_experts": [1000, 1000]}}), ValueError,
     r"backbone\.moe\.sum\(group_experts\) = 2000"),
]


@pytest.mark.parametrize("overrides,error,match", ABSURD, ids=[str(a[0]) for a in ABSURD])
def test_create_model_refuses_absurd_fields_by_name(overrides, error, match, no_building):
    with pytest.raises(error, match=match):
        ernie_vl.create_model("test", **overrides)


@pytest.mark.parametrize("overrides,error,match", ABSURD[:4], ids=[str(a[0]) for a in ABSURD[:4]])
def test_from_pretrained_refuses_absurd_config_json(overrides, error, match, tmp_path):
    folder = tmp_path / "ckpt"
    ernie_vl.create_model("test").save_pretrained(str(folder))
    data = json.loads((folder / "config.json").read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict):
                data[section][key].update(value)
            else:
                data[section][key] = value
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(error, match=match):
        ernie_vl.ErnieVL.from_pretrained(str(folder))


def test_a_config_built_directly_is_validated_too():
    cfg = load_config("test")
    with pytest.raises(ValueError, match=r"backbone\.moe\.num_experts = 5000"):
        ErnieVLConfig(backbone=type(cfg.backbone)(width=32, depth=2, num_heads=4, moe=MoEConfig(num_experts=5000)))
    cfg.backbone.depth = 10**6  # changed after it was made: ErnieVL checks again before building
    with pytest.raises(ValueError, match=r"backbone\.depth = 1000000"):
        ernie_vl.ErnieVL(cfg)


def test_over_the_parameter_limit_refuses_with_the_number(monkeypatch, no_building):
    big = dict(backbone={"width": 16384, "num_heads": 128, "depth": 64, "moe": {"num_experts": 1024, "hidden": 16384}})
    with pytest.raises(limits.ModelTooLargeError, match=r"would have [\d,]+ parameters .* over the limit of 4,000,000,000"):
        ernie_vl.create_model("test", **big)
    count = limits.estimate_params(load_config("test"))
    with pytest.raises(limits.ModelTooLargeError, match=f"would have {count:,} parameters.*limit of 100,000"):
        ernie_vl.create_model("test", max_params=100_000)
    monkeypatch.setenv(limits.MAX_PARAMS_ENV, "1e5")
    with pytest.raises(limits.ModelTooLargeError, match="limit of 100,000"):
        ernie_vl.create_model("test")
    monkeypatch.setenv(limits.MAX_PARAMS_ENV, "lots")
    with pytest.raises(ValueError, match="ERNIE_VL_MAX_PARAMS='lots'"):
        ernie_vl.create_model("test")


def test_the_limit_can_be_raised(monkeypatch):
    monkeypatch.setenv(limits.MAX_PARAMS_ENV, "1e5")
    model = ernie_vl.create_model("test", max_params=10**6)  # the argument wins over the environment
    assert sum(p.numel() for p in model.parameters()) == limits.estimate_params(model.cfg)


def test_from_pretrained_checks_the_budget_before_reading_weights(tmp_path):
    folder = tmp_path / "ckpt"
    ernie_vl.create_model("test").save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()  # never reached: the config alone is refused
    with pytest.raises(limits.ModelTooLargeError, match="limit of 1,000"):
        ernie_vl.ErnieVL.from_pretrained(str(folder), max_params=1000)


VARIANTS = [(name, {}) for name in list_models()] + [
    ("test", dict(video_encoder={"attention": "space_only"},
                  backbone={"moe": {"expert_type": "swiglu", "num_shared_experts": 2}})),
    ("test", dict(image_projector={"kind": "mlp"}, video_projector={"kind": "resampler", "depth": 3},
                  image_encoder={"head_gating": True, "ls_init": 0.1, "pre_norm": True})),
    ("test", dict(backbone={"moe_every": 0}, loss={"contrastive": "siglip"},
                  video_encoder={"tubelet_size": 2, "attention": "joint"})),
    ("test", dict(backbone={"moe": None, "moe_every": 1, "mlp_hidden": 48})),
    ("test", dict(backbone={"moe": {"routing": "groups", "group_layout": ["text", "image", "video"],
                                    "group_experts": [4, 3, 2], "group_hidden": [16, 24, 8], "top_k": 2,
                                    "num_shared_experts": 1, "score_bias": True}})),
]


@pytest.mark.parametrize("name,overrides", [v for v in VARIANTS if v[0] in ("test", "ernie45-tiny")])
def test_estimate_equals_the_built_parameter_count(name, overrides):
    cfg = load_config(name, **overrides)
    model = ernie_vl.ErnieVL(cfg)
    assert limits.estimate_params(cfg) == sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_every_preset_is_within_the_bounds():
    for name in list_models():
        limits.validate_config(load_config(name))
        assert limits.estimate_params(load_config(name)) < limits.DEFAULT_MAX_PARAMS


def test_a_deeply_nested_config_json_is_a_clear_error(tmp_path):
    folder = tmp_path / "ckpt"
    ernie_vl.create_model("test").save_pretrained(str(folder))
    (folder / "config.json").write_text('{"name": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        ernie_vl.ErnieVL.from_pretrained(str(folder))
