"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for training, with consolidated checkpoints.

:func:`shard_model` shards every transformer block (the shared backbone's, the image and video
encoders', the resampler's cross-attention blocks) as its own unit, then the root; on CUDA the
parameters compute in bfloat16 and gradients are reduced in float32 (``MixedPrecisionPolicy``).
Model and optimiser states are read and written as full, single-process state dicts
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``), so a checkpoint of
an FSDP2 run loads in one process and the reverse. Every rank must call the state functions.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ernie_vl.train.distributed import DistContext


def block_types() -> tuple[type, ...]:
    """The module classes sharded as their own FSDP2 units."""
    from encoders.blocks import Block
    from ernie_vl.backbone_block import BackboneBlock
    from ernie_vl.heads import CrossAttentionBlock

    return (Block, BackboneBlock, CrossAttentionBlock)


def shard_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``fully_shard`` each block of ``model``, then the root, over all ranks (in place); returns it.

    FSDP2 shards no 0-d parameter (the contrastive ``log_scale``): those stay replicated, outside FSDP,
    and their gradients are averaged over the ranks by a hook as soon as they are accumulated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if ctx.device.type == "cuda" else MixedPrecisionPolicy())
    scalars = {p for p in model.parameters() if p.dim() == 0}
    kinds = block_types()
    for module in model.modules():
        if isinstance(module, kinds) and module is not model:
            fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    if scalars:
        group = dist.new_group(list(range(ctx.world_size)))  # apart from FSDP's own collectives

        def average(p: torch.Tensor) -> None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(ctx.world_size)

        for p in sorted(scalars, key=lambda t: id(t)):
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(average)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (rank 0 holds it; the other ranks get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (single-process) state dict given on every rank into the sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state in ``optimizer.state_dict()``'s single-process layout (index keys, full
    tensors; rank 0 holds it). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[name]: slot for name, slot in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process optimiser state (given on every rank) into the sharded run's optimiser."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    fqn = {"state": {names[int(i)]: slot for i, slot in state["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn, options=_options())
