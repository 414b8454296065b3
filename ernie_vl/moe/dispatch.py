"""Sort-based dispatch plans: dropless, or with a per-expert capacity.

Assignments are numbered token-major: ``a = n * k + j`` is token n's j-th choice. Sorting by
(expert, slot, token) puts every expert's rows in one contiguous slice ordered by (slot, token):
with a capacity, all first choices are served before any second choice, and earlier tokens
before later ones (GShard / Switch priority). Dropped assignments contribute nothing: the
token keeps its residual (and the shared experts' output).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each assignment goes.

    order: (M,) kept assignment ids sorted by expert.
    token_index: (M,) the token of each sorted row (``order // k``).
    inverse: (k*N,) the sorted row of each assignment; M (a zero sentinel row) if dropped.
    counts: rows per expert after drops (python ints, length E, sum M).
    routed_counts: (E,) int64 assignments per expert before drops.
    dropped: () int64 assignments dropped for capacity (0 when dropless).
    capacity: per-expert capacity, or None when dropless.
    """

    order: torch.Tensor
    token_index: torch.Tensor
    inverse: torch.Tensor
    counts: list[int]
    routed_counts: torch.Tensor
    dropped: torch.Tensor
    capacity: int | None


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """``ceil(factor * tokens * k / E)``."""
    return int(math.ceil(factor * num_tokens * top_k / num_experts))


def plan_dispatch(experts: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the (N, k) expert choices by expert; keep at most ``capacity`` rows per expert."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    total = flat.numel()
    rows = torch.arange(total, device=flat.device)
    key = flat * top_k + rows % top_k  # (expert, slot); the stable sort keeps token order within
    order = torch.argsort(key, stable=True)
    routed = torch.bincount(flat, minlength=num_experts)
    if capacity is None:
        inverse = torch.empty_like(order).index_copy_(0, order, rows)
        dropped = torch.zeros((), dtype=torch.long, device=flat.device)
        counts = routed
    else:
        starts = torch.cumsum(routed, 0) - routed
        keep = (rows - starts[flat[order]]) < capacity
        order = order[keep]
        inverse = torch.full((total,), order.numel(), dtype=torch.long, device=flat.device)
        inverse.index_copy_(0, order, torch.arange(order.numel(), device=flat.device))
        counts = routed.clamp(max=capacity)
        dropped = total - counts.sum()
    return DispatchPlan(order, order // top_k, inverse, counts.tolist(), routed, dropped, capacity)
