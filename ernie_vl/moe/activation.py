"""The experts' activations by name: differentiable functions, and in-place forms for the kernels.

Names: ``gelu`` (exact erf), ``gelu_tanh``, ``quick_gelu`` (CLIP's ``x * sigmoid(1.702 x)``), ``silu``: the
subset of the registry ``encoders.activations`` that the fused expert kernels run. Imports only torch and
that registry (the fast kernels use it too).
"""
from __future__ import annotations

from typing import Callable

import torch

from encoders.activations import QUICK_GELU_ALPHA, act_fn

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "silu")


def _check(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The differentiable activation ``name`` as a function of one tensor."""
    _check(name)
    return act_fn(name)


def activation_into(h: torch.Tensor, name: str, out: torch.Tensor) -> torch.Tensor:
    """``out = act(h)`` without autograd (``out`` may be ``h``)."""
    _check(name)
    if name == "gelu":
        return torch.ops.aten.gelu.out(h, approximate="none", out=out)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu.out(h, approximate="tanh", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(h, out=out)
    return torch.mul(h, torch.sigmoid(h * QUICK_GELU_ALPHA), out=out)


def activation_grad_into(grad: torch.Tensor, h: torch.Tensor, name: str, out: torch.Tensor) -> torch.Tensor:
    """``out = grad * act'(h)`` without autograd (``out`` may be ``grad``)."""
    _check(name)
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate="none", grad_input=out)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate="tanh", grad_input=out)
    if name == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)
    s = torch.sigmoid(h * QUICK_GELU_ALPHA)
    return torch.mul(grad, s + QUICK_GELU_ALPHA * h * s * (1.0 - s), out=out)
