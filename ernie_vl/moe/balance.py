"""Aux-loss-free load balancing (ERNIE 4.5, DeepSeek-V3): a per-expert score-correction bias.

A router built with ``score_bias=True`` chooses its top-k experts by ``probs + bias`` while the
combine weights stay the chosen probabilities (the bias never enters the gradient). During
training each forward adds its per-expert assignment counts to ``router.load_count``; after
each optimiser step :func:`update_score_biases` nudges every bias toward equal load::

    bias += gamma * sign(mean_load - load)        # per routing group, then load_count = 0

so an overloaded expert becomes a little less likely to be chosen and an idle one more. It
works alone (``load_balance_coef=0``) or together with the load-balance loss.
"""
from __future__ import annotations

import torch
from torch import nn

from .router import Router


def routers_with_bias(model: nn.Module) -> list[Router]:
    """Every :class:`Router` below ``model`` that holds a score bias."""
    return [m for m in model.modules() if isinstance(m, Router) and m.score_bias is not None]


@torch.no_grad()
def bias_step(bias: torch.Tensor, load: torch.Tensor, gamma: float,
              expert_group: torch.Tensor | None = None) -> torch.Tensor:
    """``bias + gamma * sign(mean_load - load)`` for (E,) bias and load; with ``expert_group`` (E,)
    (isolated routing) the mean is taken within each expert's group. Returns the new bias."""
    if bias.shape != load.shape:
        raise ValueError(f"score bias has shape {tuple(bias.shape)} but the measured load has "
                         f"{tuple(load.shape)}: one entry per expert is needed in both")
    load = load.to(torch.float64)
    if expert_group is None:
        mean = load.mean().expand_as(load)
    else:
        groups = expert_group.to(load.device).long()
        sums = torch.zeros(int(groups.max()) + 1, dtype=load.dtype, device=load.device).index_add_(0, groups, load)
        mean = (sums / torch.bincount(groups).to(load.dtype))[groups]
    return bias + gamma * torch.sign(mean - load).to(bias.dtype)


@torch.no_grad()
def update_score_biases(model: nn.Module, gamma: float | None = None) -> int:
    """Apply the bias update to every router of ``model`` that saw tokens since the last call
    (call it after ``optimizer.step()``), then reset their load counts.

    gamma: the step, default each router's own ``bias_gamma`` (routers with gamma 0 only reset).
    Under ``torch.distributed`` the loads are summed over ranks first, so every rank moves its
    bias the same way. Returns the number of routers whose bias moved.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    moved = 0
    for router in routers_with_bias(model):
        step = router.bias_gamma if gamma is None else float(gamma)
        load = router.load_count
        if distributed:
            load = load.clone()
            torch.distributed.all_reduce(load)
        if step > 0 and int(load.sum()) > 0:
            router.score_bias.copy_(bias_step(router.score_bias, load, step, router.expert_group))
            moved += 1
        router.load_count.zero_()
    return moved


def load_cv(tokens_per_expert: torch.Tensor) -> float:
    """Coefficient of variation (std / mean, population std) of an (E,) expert load; 0 = balanced."""
    load = tokens_per_expert.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if float(mean) > 0 else 0.0
