"""Workers of the expert-parallel tests: each gloo rank runs its share of a global batch through an
EP-sharded MoE layer and compares everything with the whole layer run on the whole batch."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.expert_parallel import (consolidated_state_dict, expert_parallel_groups, expert_parameters,
                                          load_consolidated_, shard_experts_, sync_expert_grads)
from ernie_vl.moe.router import Router

TOKENS_PER_RANK = 12
D = 16


def make_layer(case: str) -> MoEFeedForward:
    """The layer of one test case, identical on every rank (seeded)."""
    torch.manual_seed(0)
    coefs = dict(load_balance_coef=0.1, z_loss_coef=0.01, orthogonal_coef=0.01)
    if case in ("shared", "uneven"):
        layer = MoEFeedForward(D, hidden=24, num_experts=4, top_k=2, num_shared_experts=1, **coefs)
    elif case == "isolated":
        layer = MoEFeedForward(D, hidden=24, num_experts=8, top_k=2, routing="isolated", expert_type="swiglu", **coefs)
    elif case == "groups":
        layer = MoEFeedForward(D, hidden=24, top_k=2, routing="groups", group_experts=(4, 8), group_hidden=(24, 20),
                               num_shared_experts=1, **coefs)
    else:
        raise ValueError(case)
    with torch.no_grad():
        for router in (m for m in layer.modules() if isinstance(m, Router)):
            router.weight.normal_(std=0.5)
        if case == "uneven":  # every token prefers experts 0 and 1: the ranks holding 2 and 3 get no rows
            layer.router.weight.zero_()
            layer.router.weight[:2] = torch.rand(2, D) + 0.5
    return layer


def make_batch(case: str, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global tokens (W*n, D), modality ids (W*n,), mask (W*n,) and the task's output weights (W*n, D)."""
    g = torch.Generator().manual_seed(1)
    n = world * TOKENS_PER_RANK
    x = torch.randn(n, D, generator=g)
    if case == "uneven":
        x = x.abs()
    ids = torch.randint(0, 3, (n,), generator=g)
    if case == "groups":  # rank 0's tokens all text, rank 1's all visual: a group empty on a rank
        ids[:TOKENS_PER_RANK] = 0
        ids[TOKENS_PER_RANK:2 * TOKENS_PER_RANK] = 1 + (torch.arange(TOKENS_PER_RANK) % 2)
    mask = torch.rand(n, generator=g) > 0.2
    return x, ids, mask, torch.randn(n, D, generator=g)


def _loss(out, weights, n_global: int, scale: float) -> torch.Tensor:
    """Task (a fixed linear read-out, summed over this rank's rows / global rows) x scale + aux."""
    return scale * (out.output * weights).sum() / n_global + out.aux_loss


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's magnitude where that exceeds 1."""
    if not b.numel():
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def check_rank(rank: int, world: int, case: str) -> dict[str, dict]:
    """Run ``case`` on this rank: ``{"errors": largest difference of every compared quantity,
    "info": the global tokens per expert}``."""
    layer = make_layer(case)
    ref = copy.deepcopy(layer)
    x, ids, mask, weights = make_batch(case, world)
    n = x.shape[0]
    # the whole layer on the whole batch
    xr = x.clone().requires_grad_(True)
    ref_out = ref(xr, ids, mask)
    _loss(ref_out, weights, n, 1.0).backward()
    # this rank's share through the sharded layer
    groups = expert_parallel_groups(world)
    shard_experts_(layer, groups)
    lo, hi = rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK
    xl = x[lo:hi].clone().requires_grad_(True)
    out = layer(xl, ids[lo:hi], mask[lo:hi])
    _loss(out, weights[lo:hi], n, float(world)).backward()
    sync_expert_grads(layer, groups)
    errs = {"output": _err(out.output, ref_out.output[lo:hi]), "x_grad": _err(xl.grad / world, xr.grad[lo:hi])}
    for key in ("aux_loss", "load_balance_loss", "z_loss", "orthogonal_loss"):
        errs[key] = _err(getattr(out, key), getattr(ref_out, key))
    for key in ("tokens_per_expert", "usage_by_modality", "router_entropy", "num_tokens", "activated_param_ratio"):
        errs[f"stats.{key}"] = _err(getattr(out.stats, key), getattr(ref_out.stats, key))
    errs["stats.overlap_rate"] = _err(out.stats.overlap_rate.nan_to_num(-1), ref_out.stats.overlap_rate.nan_to_num(-1))
    ref_params = dict(ref.named_parameters())
    sharded = {name for name, _ in expert_parameters(layer)}
    for name, p in layer.named_parameters():
        grad = p.grad.clone()
        if name in sharded:  # gathered over the EP group
            parts = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(parts, grad)
            grad = torch.cat(parts)
        else:  # replicated: the data-parallel mean
            dist.all_reduce(grad)
            grad /= world
        errs[f"grad.{name}"] = _err(grad, ref_params[name].grad)
    full = consolidated_state_dict(layer)
    expected = ref.state_dict()
    errs["checkpoint.keys_differ"] = float(set(full) != set(expected))
    errs["checkpoint.values"] = max(_err(full[k], expected[k]) for k in expected)
    other = make_layer(case)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    load_consolidated_(layer, other.state_dict())
    again = consolidated_state_dict(layer)
    errs["checkpoint.reload"] = max(_err(again[k], v) for k, v in other.state_dict().items())
    return {"errors": errs, "info": {"tokens_per_expert": out.stats.tokens_per_expert.tolist()}}


def worker(rank: int, world: int, store: str, case: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        errs = check_rank(rank, world, case)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errs))
    finally:
        dist.destroy_process_group()


def _spawn(target, world: int, tmp: Path, args: tuple, timeout: float) -> None:
    from _train_helpers import start_and_join

    store = str(tmp / "store")
    if os.path.exists(store):
        os.remove(store)
    start_and_join(target, [(r, world, store, *args) for r in range(world)], ["_ep_helpers"], timeout)


def run_ranks(world: int, case: str, tmp: Path, timeout: float = 120.0) -> list[dict[str, dict]]:
    """Spawn ``world`` gloo ranks of ``case``; their :func:`check_rank` results in rank order."""
    _spawn(worker, world, tmp, (case, str(tmp)), timeout)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def reshard_worker(rank: int, world: int, store: str, saved: str, out_dir: str) -> None:
    """Load a saved model, shard it at EP 4 and at EP 2 (2 replicas), gather it back and compare with the
    file; rank 0 also saves the EP-4 model's gathered copy to OUT/saved_at_4."""
    from safetensors.torch import load_file

    from ernie_vl import ErnieVL
    from ernie_vl.moe.expert_parallel import gathered_copy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        original = load_file(str(Path(saved) / "model.safetensors"))
        errs = {}
        for size in (4, 2):
            model = ErnieVL.from_pretrained(saved)
            groups = expert_parallel_groups(size)
            shard_experts_(model, groups)
            plain = ErnieVL.from_pretrained(saved)
            load_consolidated_(model, plain.state_dict())
            full = consolidated_state_dict(model)
            errs[str(size)] = max(_err(full[k], original[k]) for k in original) + float(set(full) != set(original))
            if size == 4:
                copy_ = gathered_copy(model)
                if rank == 0:
                    copy_.save_pretrained(str(Path(out_dir) / "saved_at_4"))
        dist.barrier()
        Path(out_dir, f"reshard{rank}.json").write_text(json.dumps(errs))
    finally:
        dist.destroy_process_group()


def reshard_ranks(world: int, saved: Path, tmp: Path, timeout: float = 120.0) -> list[dict[str, float]]:
    _spawn(reshard_worker, world, tmp, (str(saved), str(tmp)), timeout)
    return [json.loads((tmp / f"reshard{r}.json").read_text()) for r in range(world)]
