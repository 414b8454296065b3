"""Expert parallelism in the trainer: set-up from ``--expert-parallel E``, gradient clipping over the
sharded experts, consolidated model states (see :mod:`ernie_vl.moe.expert_parallel` for the layer)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ernie_vl.moe.expert_parallel import (ExpertParallelGroups, check_expert_parallel, consolidated_state_dict,
                                          expert_grad_norm_sq, expert_parallel_groups, expert_parameters,
                                          gathered_copy, load_consolidated_, shard_experts_)


def setup_expert_parallel(model: nn.Module, size: int, world_size: int) -> Optional[ExpertParallelGroups]:
    """Shard ``model``'s experts over EP groups of ``size`` ranks (None when ``size`` is 1). Raises
    ValueError naming the numbers when ``size`` divides neither the world size nor every expert set."""
    if size == 1:
        return None
    check_expert_parallel(size, world_size, model)
    groups = expert_parallel_groups(size)
    shard_experts_(model, groups)
    return groups


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert tensors (DDP must leave them alone: they differ per rank)."""
    return [name for name, _ in expert_parameters(model)]


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ep: Optional[ExpertParallelGroups]) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, the sharded experts' gradients included
    (their squared norm summed over the EP group), so every rank clips by the same factor."""
    if ep is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    sharded = {id(p) for _, p in expert_parameters(model)}
    with_grad = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in with_grad]
    replicated = [p.grad.float().square().sum() for p in with_grad if id(p) not in sharded]
    total = expert_grad_norm_sq(model, ep)
    if replicated:
        total = total + torch.stack(replicated).sum().to(total.device)
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return norm


def model_state(model: nn.Module, ep: Optional[ExpertParallelGroups]) -> dict[str, torch.Tensor]:
    """The model's state dict, experts gathered under EP (collective then: every rank calls it)."""
    return model.state_dict() if ep is None else consolidated_state_dict(model)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], ep: Optional[ExpertParallelGroups]) -> Any:
    """Load a full (single-process) state dict, slicing the experts for this rank under EP."""
    return model.load_state_dict(state) if ep is None else load_consolidated_(model, state)


def plain_model(model: nn.Module, ep: Optional[ExpertParallelGroups]) -> nn.Module:
    """``model`` itself, or under EP an unsharded copy with every expert (collective)."""
    return model if ep is None else gathered_copy(model)


def _expert_slots(optimizer: torch.optim.Optimizer, model: nn.Module,
                  ep: ExpertParallelGroups) -> dict[int, tuple[nn.Parameter, Any]]:
    """Optimizer state index -> (expert parameter, its EP shard) for every sharded expert tensor."""
    from ernie_vl.moe.expert_parallel import _shard_of

    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {index[id(p)]: (p, _shard_of(model, name)) for name, p in expert_parameters(model) if id(p) in index}


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                    ep: Optional[ExpertParallelGroups]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the expert tensors' moments gathered over the EP group
    (collective under EP), so the training state is the single-process one and resumes at any EP size."""
    state = optimizer.state_dict()
    if ep is None:
        return state
    import torch.distributed as dist

    for i, (p, shard) in sorted(_expert_slots(optimizer, model, ep).items()):
        slot = dict(state["state"].get(i, {}))
        for key, value in slot.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                parts = [torch.empty_like(value) for _ in range(shard.size)]
                dist.all_gather(parts, value.contiguous(), group=shard.group)
                slot[key] = torch.cat(parts)
        state["state"][i] = slot
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any],
                         ep: Optional[ExpertParallelGroups]) -> None:
    """Load a full optimizer state (from :func:`optimizer_state`), slicing the expert moments for this rank."""
    if ep is not None:
        state = {**state, "state": dict(state["state"])}
        for i, (p, shard) in _expert_slots(optimizer, model, ep).items():
            slot = dict(state["state"].get(i, {}))
            n = p.shape[0]
            for key, value in slot.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n * shard.size:
                    slot[key] = value[shard.rank * n:(shard.rank + 1) * n]
            state["state"][i] = slot
    optimizer.load_state_dict(state)


def ema_state(ema: Any, model: nn.Module, ep: Optional[ExpertParallelGroups]) -> Optional[dict[str, Any]]:
    """``ema.state_dict()`` (None without an EMA) with the experts' shadows gathered under EP (collective)."""
    if ema is None:
        return None
    state = ema.state_dict()
    if ep is not None:
        from ernie_vl.moe.expert_parallel import gather_experts

        state = {**state, "shadow": gather_experts(model, state["shadow"])}
    return state


def load_ema_state(ema: Any, model: nn.Module, state: dict[str, Any], ep: Optional[ExpertParallelGroups]) -> None:
    """Load a full EMA state, the experts' shadows cut to this rank's experts under EP."""
    if ep is not None:
        from ernie_vl.moe.expert_parallel import slice_experts

        state = {**state, "shadow": slice_experts(model, state["shadow"])}
    ema.load_state_dict(state)
