"""One expert on one slice of rows, forward and backward, into preallocated buffers.

params: mlp = (w1 (E, H, D), b1 (E, H) | None, w2 (E, D, H), b2 (E, D) | None);
swiglu = (w_gate_up (E, 2H, D), w_down (E, D, H)), every expert in nn.Linear layout. Products go
through an explicit :class:`~.products.Products`; temporaries are per-thread scratch slots.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..activation import activation_grad_into, activation_into
from .products import Products
from .workspace import scratch

Params = Sequence["torch.Tensor | None"]


def hidden_width(kind: str, params: Params) -> int:
    """Width of the pre-activation ``h`` (H for mlp, 2H = [gate; up] for swiglu)."""
    return params[0].shape[1]


def act_width(kind: str, params: Params) -> int:
    """Width of the activation fed to the second product (H)."""
    return params[0].shape[1] if kind == "mlp" else params[1].shape[2]


def expert_activation(kind: str, act: str, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a = act(h)`` (mlp; ``a`` may be ``h``) or ``act(gate) * up`` (swiglu, h = [gate | up])."""
    if kind == "mlp":
        return activation_into(h, act, a)
    hidden = a.shape[1]
    activation_into(h[:, :hidden], act, a)
    return a.mul_(h[:, hidden:])


def expert_forward(kind: str, act: str, params: Params, e: int, x: torch.Tensor, h: torch.Tensor,
                   a: torch.Tensor, y: torch.Tensor, products: Products) -> None:
    """Expert e on rows x (n, D): pre-activation -> h, activation -> a (may be h for mlp), output -> y."""
    if kind == "mlp":
        w1, b1, w2, b2 = params
        products.addmm(None if b1 is None else b1[e], x, w1[e].t(), h)
        activation_into(h, act, a)
        products.addmm(None if b2 is None else b2[e], a, w2[e].t(), y)
    else:
        w_gate_up, w_down = params
        products.mm(x, w_gate_up[e].t(), h)
        expert_activation(kind, act, h, a)
        products.mm(a, w_down[e].t(), y)


def expert_backward(kind: str, act: str, params: Params, grads: Sequence[torch.Tensor | None], e: int,
                    dy: torch.Tensor, x: torch.Tensor | None, h: torch.Tensor, dx: torch.Tensor | None,
                    products: Products) -> None:
    """Gradients of expert e on one slice of n rows, the activation recomputed from ``h``.

    dy (n, D) weighted output gradient, x (n, D) input rows (needed for the first weight's
    gradient), h (n, Hw) saved pre-activation; weight grads go into ``grads[i][e]``, the input
    gradient into dx (n, D). The output bias gradient is the caller's (a sum of dy).
    """
    n = dy.shape[0]
    second_w, second_grad = params[2 if kind == "mlp" else 1], grads[2 if kind == "mlp" else 1]
    hidden = second_w.shape[2]
    if second_grad is not None:
        a = expert_activation(kind, act, h, scratch("bwd_act", (n, hidden), h))
        products.mm(dy.t(), a, second_grad[e])
    first_grad = grads[0]
    first_bias_grad = grads[1] if kind == "mlp" else None
    if first_grad is None and first_bias_grad is None and dx is None:
        return
    da = products.mm(dy, second_w[e], scratch("bwd_grad", (n, hidden), h))
    if kind == "mlp":
        dh = activation_grad_into(da, h, act, out=da)
    else:
        g, u = h[:, :hidden], h[:, hidden:]
        dh = scratch("bwd_dh", (n, 2 * hidden), h)
        activation_into(g, act, dh[:, hidden:]).mul_(da)  # d up = act(gate) * da
        torch.mul(da, u, out=dh[:, :hidden])
        activation_grad_into(dh[:, :hidden], g, act, out=dh[:, :hidden])  # d gate
    if first_grad is not None:
        products.mm(dh.t(), x, first_grad[e])
    if first_bias_grad is not None:
        torch.sum(dh, dim=0, out=first_bias_grad[e])
    if dx is not None:
        products.mm(dh, params[0][e], dx)
