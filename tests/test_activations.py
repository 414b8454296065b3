"""encoders.activations: one registry taking a name, a module class or a module (timm's create_act habit)."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from torch import nn

from encoders.activations import ACTIVATIONS, QuickGELU, act_fn, act_name, canonical_act, create_act

X = torch.linspace(-4, 4, 101)
REFERENCE = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))),
    "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x)),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "relu": lambda x: x.clamp(min=0),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_module_and_function_compute_the_formula(name):
    expected = REFERENCE[name](X)
    torch.testing.assert_close(create_act(name)(X), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(act_fn(name)(X), expected, atol=1e-6, rtol=1e-6)
    assert act_name(create_act(name)) == name


@pytest.mark.parametrize("given,name", [
    (nn.GELU, "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"), (nn.ReLU, "relu"),
    (QuickGELU, "quick_gelu"), (OpenClipQuickGELU(), "quick_gelu"), ("gelu_pytorch_tanh", "gelu_tanh"),
    ("gelu_new", "gelu_tanh"), ("swish", "silu"), ("GELU", "gelu"),
])
def test_names_classes_instances_and_aliases(given, name):
    assert act_name(given) == name
    module = create_act(given)
    torch.testing.assert_close(module(X), REFERENCE[name](X), atol=1e-6, rtol=1e-6)
    if isinstance(given, nn.Module):
        assert module is not given  # a fresh module, never the caller's


def test_a_class_outside_the_registry_is_instantiated_as_is():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    module = create_act(Square)
    assert isinstance(module, Square)
    torch.testing.assert_close(module(X), X * X)
    with pytest.raises(ValueError, match="unsupported activation Square; supported: GELU"):
        act_name(Square)


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown activation 'mish'; valid: gelu, gelu_tanh, quick_gelu, silu, relu"):
        canonical_act("mish")
    with pytest.raises(ValueError, match="mish"):
        create_act("mish")
    with pytest.raises(TypeError, match="must be a string, got int"):
        canonical_act(3)


def test_the_model_layers_use_the_registry():
    from encoders.blocks import Mlp
    from ernie_vl.moe.experts import DenseMLP
    from ernie_vl.quantize import activation_name

    assert isinstance(Mlp(4, 8, act=nn.SiLU).act, nn.SiLU)
    mlp = DenseMLP(4, 8, activation="quick_gelu")
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp.proj(REFERENCE["quick_gelu"](mlp.fc(x))), atol=1e-6, rtol=1e-6)
    assert activation_name(nn.Tanh()) is None  # no int8 fusion for an activation outside the registry
