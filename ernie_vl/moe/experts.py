"""Expert feed-forward networks: stacked (E, ...) weights, and their dense counterparts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .activation import activation_fn


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's default init range for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class DenseMLP(nn.Module):
    """fc Linear -> act -> proj Linear on (..., D); the dense block MLP (open_clip layout).

    ``upcycle`` reads ``fc`` / ``proj`` (weights and biases) and ``activation``.
    """

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.activation = activation
        self._act = activation_fn(activation)
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._act(self.fc(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class DenseSwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) on (..., D), no biases (Mixtral / LLaMA layout)."""

    def __init__(self, d_model: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        self.activation = activation
        self._act = activation_fn(activation)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self._act(g) * u)


class MLPExperts(nn.Module):
    """E GELU-style MLP experts stored as stacked tensors.

    w1 (E, H, D), b1 (E, H), w2 (E, D, H), b2 (E, D) — each expert in nn.Linear layout.
    The fused kernels in :mod:`ernie_vl.moe.kernels` run them (``kind``, ``params()``);
    ``expert(x, e)`` is a plain-autograd reference for one expert.
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "gelu",
                 bias: bool = True) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = activation
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.w1, self.d_model)
        _uniform_(self.w2, self.hidden)
        if self.b1 is not None:
            _uniform_(self.b1, self.d_model)
            _uniform_(self.b2, self.hidden)

    def params_per_expert(self) -> int:
        n = 2 * self.d_model * self.hidden
        return n + (self.hidden + self.d_model if self.b1 is not None else 0)

    kind = "mlp"

    def params(self) -> tuple[torch.Tensor | None, ...]:
        """The stacked tensors in the order the fused kernels take them."""
        return (self.w1, self.b1, self.w2, self.b2)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` alone on (N, D), with plain autograd ops (reference path)."""
        b1 = None if self.b1 is None else self.b1[e]
        b2 = None if self.b2 is None else self.b2[e]
        return F.linear(activation_fn(self.activation)(F.linear(x, self.w1[e], b1)), self.w2[e], b2)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation}, bias={self.b1 is not None}")


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts: w_gate_up (E, 2H, D) = [gate; up], w_down (E, D, H); no biases.

    The layout equals transformers' ``MixtralExperts`` (``gate_up_proj`` / ``down_proj``).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.activation = activation
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.w_gate_up, self.d_model)
        _uniform_(self.w_down, self.hidden)

    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    kind = "swiglu"

    def params(self) -> tuple[torch.Tensor, ...]:
        """The stacked tensors in the order the fused kernels take them."""
        return (self.w_gate_up, self.w_down)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` alone on (N, D), with plain autograd ops (reference path)."""
        g, u = F.linear(x, self.w_gate_up[e]).chunk(2, dim=-1)
        return F.linear(activation_fn(self.activation)(g) * u, self.w_down[e])

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, "
                f"activation={self.activation}")
