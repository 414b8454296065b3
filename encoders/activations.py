"""One registry of activations: a name, a module class or a module in; a module, a function or a name out.

``create_act("gelu_tanh")``, ``create_act(nn.SiLU)`` and ``create_act(nn.GELU(approximate="tanh"))`` all work
(timm's ``create_act_layer`` habit); ``act_fn(name)`` is the same activation as a function of one tensor (for
fused expert kernels and int8 GEMMs); ``act_name(module)`` is the registry name of a module (for weight
converters that read open_clip / timm / Hugging Face models). Names of other libraries (``gelu_pytorch_tanh``,
``gelu_new``, ``swish``) are accepted as aliases.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

QUICK_GELU_ALPHA = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


# name -> (module factory, function)
_REGISTRY: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = {
    "gelu": (nn.GELU, F.gelu),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), _gelu_tanh),
    "quick_gelu": (QuickGELU, _quick_gelu),
    "silu": (nn.SiLU, F.silu),
    "relu": (nn.ReLU, F.relu),
}
ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
           "quickgelu": "quick_gelu", "swish": "silu"}
ACTIVATIONS: tuple[str, ...] = tuple(_REGISTRY)

ActLike = Union[str, type, nn.Module]


def canonical_act(name: str) -> str:
    """The registry name for ``name`` or one of its aliases; ValueError naming the valid ones otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a string, got {type(name).__name__}: {name!r}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return key


def act_name(act: ActLike) -> str:
    """The registry name of an activation given as a name, a module class or a module instance."""
    if isinstance(act, str):
        return canonical_act(act)
    module = act() if isinstance(act, type) and issubclass(act, nn.Module) else act
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    for name, (factory, _) in _REGISTRY.items():
        if isinstance(factory, type) and type(module) is factory:
            return name
    if type(module).__name__ == "QuickGELU":  # open_clip's own QuickGELU class
        return "quick_gelu"
    raise ValueError(f"unsupported activation {type(module).__name__}; supported: GELU, GELU(tanh), "
                     f"QuickGELU, SiLU, ReLU (names: {', '.join(ACTIVATIONS)})")


def create_act(act: ActLike) -> nn.Module:
    """A fresh activation module from a name, a module class, or a module (its registry equivalent)."""
    if isinstance(act, type) and issubclass(act, nn.Module) and act not in {f for f, _ in _REGISTRY.values()}:
        return act()  # a user's own activation class: take it as it is
    return _REGISTRY[act_name(act)][0]()


def act_fn(act: ActLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """The differentiable activation as a function of one tensor."""
    return _REGISTRY[act_name(act)][1]
