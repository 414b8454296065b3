"""Padded batched experts: every expert's rows padded to the largest count, two batched matmuls.

The slice loop of :mod:`ernie_vl.moe.grouped` runs ~3 multi-threaded kernels per expert; each
ends in a barrier of the intra-op threads, which is cheap on an idle machine but costs up to
a scheduler time slice when other processes share the cores. With the rows of expert e laid
out in block e of an (E, C, D) tensor (C = the largest count, unused rows padded), the whole
expert computation is one ``baddbmm``, one activation and one ``baddbmm`` (MKL splits the
batch of experts between the threads), at the price of the padded rows' FLOPs. So
:func:`ernie_vl.moe.grouped.moe_experts` uses it only with several intra-op threads and
when padding adds at most ``MAX_PADDING`` of the rows (see ``choose_kernel``).

Padded rows gather token 0 and carry weight 0: their outputs are never read, their output
gradient is zero, so they add nothing to any gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .workspace import scratch

MAX_PADDING = 0.125  # padded rows allowed, as a fraction of the real rows


@dataclass
class PaddedLayout:
    """Where sorted rows go in the (E, C) padded blocks.

    capacity: C, rows per expert block; pad_token (E*C,) token of each padded row (0 for
    padding); pad_inverse (N*k,) padded row of each assignment, E*C (a zero sentinel) when
    dropped; pad_weight (E*C,) router weight of each padded row (0 for padding).
    """

    capacity: int
    pad_token: torch.Tensor
    pad_inverse: torch.Tensor
    pad_weight: torch.Tensor


def padding_fits(counts: Sequence[int]) -> bool:
    """True when padding every expert to the largest count adds at most ``MAX_PADDING``."""
    m = sum(counts)
    return m > 0 and len(counts) * max(counts) <= (1.0 + MAX_PADDING) * m


def padded_layout(counts: Sequence[int], order: torch.Tensor, token_index: torch.Tensor,
                  inverse: torch.Tensor, weights: torch.Tensor) -> PaddedLayout:
    """Padded positions of the M sorted rows (plan order) for per-expert ``counts``."""
    device = token_index.device
    num_experts, cap, m = len(counts), max(counts), token_index.shape[0]
    counts_t = torch.tensor(counts, device=device)
    expert = torch.repeat_interleave(torch.arange(num_experts, device=device), counts_t, output_size=m)
    starts = torch.cumsum(counts_t, 0) - counts_t
    pad_row = expert * cap + torch.arange(m, device=device) - starts[expert]  # (M,)
    total = num_experts * cap
    pad_token = torch.zeros(total, dtype=torch.long, device=device).index_copy_(0, pad_row, token_index)
    w_sorted = weights.reshape(-1).index_select(0, order)
    pad_weight = weights.new_zeros(total).index_copy_(0, pad_row, w_sorted)
    pad_row_ext = torch.cat([pad_row, pad_row.new_full((1,), total)])  # sorted row M = dropped
    return PaddedLayout(cap, pad_token, pad_row_ext.index_select(0, inverse), pad_weight)


def _bias3(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.unsqueeze(1)


def _bmm_into(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out[e] = x[e] @ w[e].T (+ b[e])``, w (E, out, in) in nn.Linear layout."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2), out=out)
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2), out=out)


def padded_forward(kind: str, act: str, params, x: torch.Tensor, layout: PaddedLayout,
                   h: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> None:
    """All experts on the padded rows: h (E, C, Hw) pre-activation, a (E, C, H) activation
    (may be h for mlp), rows (E*C+1, D) outputs (last row zeroed here)."""
    from .grouped import expert_activation

    num_experts, cap = h.shape[0], layout.capacity
    d = x.shape[1]
    xp = torch.index_select(x, 0, layout.pad_token, out=scratch("rows_in", (num_experts * cap, d), x))
    xp = xp.view(num_experts, cap, d)
    y = rows[:-1].view(num_experts, cap, d)
    rows[-1].zero_()
    if kind == "mlp":
        w1, b1, w2, b2 = params
        _bmm_into(xp, w1, b1, h)
        expert_activation(kind, act, h.view(-1, h.shape[2]), a.view(-1, a.shape[2]))
        _bmm_into(a, w2, b2, y)
    else:
        w_gate_up, w_down = params
        torch.bmm(xp, w_gate_up.transpose(1, 2), out=h)
        expert_activation(kind, act, h.view(-1, h.shape[2]), a.view(-1, a.shape[2]))
        torch.bmm(a, w_down.transpose(1, 2), out=y)


def padded_backward(kind: str, act: str, params, grads, x: torch.Tensor, layout: PaddedLayout,
                    h: torch.Tensor, dout: torch.Tensor, need_x: bool) -> torch.Tensor | None:
    """Gradients of all experts at once; weight grads into ``grads`` (whole tensors),
    returns (E*C+1, D) scratch input gradients of the padded rows (last row 0) or None."""
    from .grouped import activation_backward, activation_forward, expert_activation

    num_experts, cap, hw = h.shape
    d = x.shape[1]
    total = num_experts * cap
    dy = torch.index_select(dout, 0, layout.pad_token, out=scratch("dy", (total, d), dout))
    dy.mul_(layout.pad_weight.to(dy.dtype)[:, None])  # padding rows: weight 0 -> gradient 0
    dy3 = dy.view(num_experts, cap, d)
    if kind == "mlp":
        w1, _, w2, _ = params
        dw1, db1, dw2, db2 = grads
        second_w, second_grad = w2, dw2
    else:
        w1, w2 = params
        dw1, dw2 = grads
        db1 = db2 = None
        second_w, second_grad = w2, dw2
    hidden = second_w.shape[2]
    if second_grad is not None:
        a = scratch("bwd_act", (total, hidden), h)
        expert_activation(kind, act, h.view(total, hw), a)
        torch.bmm(dy3.transpose(1, 2), a.view(num_experts, cap, hidden), out=second_grad)
    if db2 is not None:
        torch.sum(dy3, dim=1, out=db2)
    if dw1 is None and db1 is None and not need_x:
        return None
    da = torch.bmm(dy3, second_w, out=scratch("bwd_grad", (num_experts, cap, hidden), h))
    h2 = h.view(total, hw)
    if kind == "mlp":
        dh = activation_backward(da.view(total, hidden), h2, act, out=da.view(total, hidden))
    else:
        g, u = h2[:, :hidden], h2[:, hidden:]
        dh = scratch("bwd_dh", (total, hw), h)
        da2 = da.view(total, hidden)
        activation_forward(g, act, dh[:, hidden:]).mul_(da2)
        torch.mul(da2, u, out=dh[:, :hidden])
        activation_backward(dh[:, :hidden], g, act, out=dh[:, :hidden])
    dh3 = dh.view(num_experts, cap, hw)
    if dw1 is not None:
        xp = torch.index_select(x, 0, layout.pad_token, out=scratch("rows_in", (total, d), x))
        torch.bmm(dh3.transpose(1, 2), xp.view(num_experts, cap, d), out=dw1)
    if db1 is not None:
        torch.sum(dh3, dim=1, out=db1)
    if not need_x:
        return None
    dx = scratch("dx_sorted", (total + 1, d), x)
    dx[total].zero_()
    torch.bmm(dh3, w1, out=dx[:total].view(num_experts, cap, d))
    return dx
