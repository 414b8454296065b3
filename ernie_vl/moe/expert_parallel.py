"""Expert parallelism: each rank of an EP group holds ``num_experts / E`` experts of every MoE layer.

Split: every expert set is cut into E equal contiguous slices, rank r of the EP group holding slice r.
In ``routing="groups"`` (ERNIE 4.5 VL) each modality group's experts are split on their own, so every
rank holds ``group_experts[g] / E`` experts of every group (ERNIE 4.5's layout: a rank's load then
follows the batch's modality mix evenly instead of one rank serving all text, another all vision).
The routers, shared experts and everything outside the experts stay replicated.

One forward of a sharded layer (all tokens of all groups in ONE exchange, so the ranks' collectives
always match in number and order, whatever modalities a rank's batch holds):

1. route the local tokens with the replicated router (every group, an empty one too);
2. exchange the per-(rank, expert) row counts (``all_to_all_single``), then the rows themselves
   (``all_to_all_single`` with those splits, an autograd Function whose backward is the reverse
   exchange); 3. run the local experts; 4. send the outputs back the same way; 5. combine with the
   router weights locally.

Losses and statistics: the load-balance inputs (assignment counts, summed router probabilities,
token counts, per-modality usage, entropy, the z-loss sum) are all-reduced over the EP group, so
the aux losses and :class:`RoutingStats` equal the single-process ones over the EP group's global
batch. The reduced sums are differentiable with a *local* gradient scaled by E (no collective in
backward): averaged over the data-parallel ranks (DDP's mean) that is exactly the gradient of the
global loss. Expert gradients are the sum over the ranks that sent tokens; :func:`sync_expert_grads`
sums them over the ranks that hold the same experts and divides by the world size (DDP's mean).

Dropless dispatch only: a per-expert capacity would depend on the global token order.
Checkpoints: :func:`consolidated_state_dict` gathers every expert (keys and shapes of the
unsharded model); :func:`load_consolidated_` slices a full state dict for this rank, so a
checkpoint saved at one EP size loads at any other.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..modality import NUM_MODALITIES, is_visual
from .stats import RoutingStats, overlap_rate

if TYPE_CHECKING:
    from .layer import MoEFeedForward, MoEOutput

EXPERT_PARAMS = ("w1", "b1", "w2", "b2", "w_gate_up", "w_down")


@dataclass
class ExpertShard:
    """Where one MoE layer's experts live: the EP ``group``, this process's ``rank`` in it, its ``size``."""

    group: Any
    rank: int
    size: int

    def __deepcopy__(self, memo: dict) -> "ExpertShard":  # a copied model (EMA) shares the process group
        return self


@dataclass
class ExpertParallelGroups:
    """This process's EP group (consecutive ranks) and expert data-parallel group (same EP rank)."""

    ep_group: Any
    dp_group: Any
    ep_size: int
    ep_rank: int
    dp_size: int
    world_size: int


# ---- set-up --------------------------------------------------------------------------------------

def moe_layers(model: nn.Module) -> Iterator[tuple[str, "MoEFeedForward"]]:
    """The top-level MoE layers of ``model`` (not the groups' sub-layers), with their names."""
    from .layer import MoEFeedForward

    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward) and ".groups." not in f".{name}.":
            yield name, module


def _expert_sets(layer: "MoEFeedForward") -> list["MoEFeedForward"]:
    return list(layer.groups) if layer.groups is not None else [layer]


def check_expert_parallel(ep_size: int, world_size: int, model: nn.Module | None = None) -> None:
    """Raise ValueError unless ``ep_size`` divides ``world_size`` and every expert set of ``model``."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert-parallel size must be an integer >= 1, got {ep_size!r}")
    if world_size % ep_size:
        raise ValueError(f"world size {world_size} is not divisible by --expert-parallel {ep_size}; "
                         f"use a size that divides {world_size}")
    for name, layer in moe_layers(model) if model is not None else ():
        cfg = layer.config
        if cfg.dispatch != "dropless":
            raise ValueError(f"expert parallelism needs dropless dispatch; {name} uses dispatch={cfg.dispatch!r}")
        for g, sub in enumerate(_expert_sets(layer)):
            e = sub.config.num_experts
            if e % ep_size:
                what = f"group {g} ({cfg.group_layout[g]})" if layer.groups is not None else "layer"
                valid = [d for d in range(1, e + 1) if e % d == 0]
                raise ValueError(f"--expert-parallel {ep_size} does not divide the {e} experts of {what} {name}; "
                                 f"valid sizes: {', '.join(map(str, valid))}")


def expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the EP groups (ranks ``[i*E, (i+1)*E)``) and the expert data-parallel groups (ranks
    ``j, j+E, ...``); every rank must call this, in the same order (``new_group`` is collective)."""
    if not dist.is_initialized():
        raise ValueError("expert parallelism needs an initialised process group (torchrun / --nproc)")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_expert_parallel(ep_size, world)
    ep_group = dp_group = None
    for i in range(world // ep_size):
        g = dist.new_group(list(range(i * ep_size, (i + 1) * ep_size)))
        if rank // ep_size == i:
            ep_group = g
    for j in range(ep_size):
        g = dist.new_group(list(range(j, world, ep_size)))
        if rank % ep_size == j:
            dp_group = g
    return ExpertParallelGroups(ep_group, dp_group, ep_size, rank % ep_size, world // ep_size, world)


def shard_experts_(model: nn.Module, groups: ExpertParallelGroups) -> nn.Module:
    """Keep only this rank's slice of every MoE layer's experts (in place); returns ``model``."""
    check_expert_parallel(groups.ep_size, groups.world_size, model)
    shard = ExpertShard(groups.ep_group, groups.ep_rank, groups.ep_size)
    for _, layer in moe_layers(model):
        for sub in _expert_sets(layer):
            experts = sub.experts
            local = sub.config.num_experts // shard.size
            lo = shard.rank * local
            for pname in EXPERT_PARAMS:
                p = getattr(experts, pname, None)
                if isinstance(p, nn.Parameter):
                    setattr(experts, pname, nn.Parameter(p.detach()[lo:lo + local].clone(), p.requires_grad))
            experts.num_experts = local
            sub.expert_shard = shard
        layer.expert_shard = shard
    for module in model.modules():  # a closed-gate shortcut would skip this rank's exchange
        if hasattr(module, "skip_closed"):
            module.skip_closed = False
    return model


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every sharded expert tensor of ``model``."""
    for name, layer in moe_layers(model):
        if layer.expert_shard is None:
            continue
        for sub_name, sub in layer.named_modules():
            if sub.__class__.__name__.endswith("Experts"):
                for pname in EXPERT_PARAMS:
                    p = getattr(sub, pname, None)
                    if isinstance(p, nn.Parameter):
                        yield ".".join(x for x in (name, sub_name, pname) if x), p


# ---- gradients and checkpoints ----------------------------------------------------------------------

@torch.no_grad()
def sync_expert_grads(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """After backward: sum each expert gradient over the ranks holding the same experts, then divide by
    the world size (the mean DDP takes over the replicated parameters)."""
    for _, p in expert_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if groups.dp_size > 1:
            dist.all_reduce(p.grad, group=groups.dp_group)
        p.grad.div_(groups.world_size)


@torch.no_grad()
def expert_grad_norm_sq(model: nn.Module, groups: ExpertParallelGroups) -> torch.Tensor:
    """Squared L2 norm of all expert gradients of the whole model (summed over the EP group)."""
    grads = [p.grad.float() for _, p in expert_parameters(model) if p.grad is not None]
    total = torch.stack([g.square().sum() for g in grads]).sum() if grads else torch.zeros(())
    dist.all_reduce(total, group=groups.ep_group)
    return total


@torch.no_grad()
def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every expert tensor gathered over its EP group (collective: every
    rank calls it); keys and shapes equal the unsharded model's."""
    return gather_experts(model, model.state_dict())


@torch.no_grad()
def gather_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` keyed by parameter name (a state dict, EMA shadows) with each sharded expert entry
    gathered over its EP group (collective)."""
    tensors = dict(tensors)
    for name, _ in expert_parameters(model):
        if name in tensors:
            shard = _shard_of(model, name)
            local = tensors[name].detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(shard.size)]
            dist.all_gather(parts, local, group=shard.group)
            tensors[name] = torch.cat(parts)
    return tensors


def slice_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`gather_experts`: each full expert entry cut to this rank's experts. A tensor
    whose expert count is not the layer's raises ValueError."""
    tensors = dict(tensors)
    for name, p in expert_parameters(model):
        if name not in tensors:
            continue
        shard = _shard_of(model, name)
        full = tensors[name]
        if full.shape[0] != p.shape[0] * shard.size or tuple(full.shape[1:]) != tuple(p.shape[1:]):
            raise ValueError(f"{name}: checkpoint tensor {tuple(full.shape)} does not match "
                             f"{p.shape[0] * shard.size} experts of shape {tuple(p.shape[1:])}")
        tensors[name] = full[shard.rank * p.shape[0]:(shard.rank + 1) * p.shape[0]]
    return tensors


@torch.no_grad()
def load_consolidated_(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
    """Load a full (unsharded) state dict into an EP-sharded ``model``: each expert tensor sliced to
    this rank's experts (:func:`slice_experts`)."""
    return model.load_state_dict(slice_experts(model, state), strict=strict)


def gathered_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of an EP-sharded ``model``: every expert gathered, a plain single-process model
    (to save, evaluate or export). Collective: every rank of every EP group calls it."""
    full = consolidated_state_dict(model)
    plain = copy.deepcopy(model)
    for _, layer in moe_layers(plain):
        for sub in _expert_sets(layer):
            experts = sub.experts
            for pname in EXPERT_PARAMS:
                p = getattr(experts, pname, None)
                if isinstance(p, nn.Parameter):
                    shape = (sub.config.num_experts,) + tuple(p.shape[1:])
                    setattr(experts, pname, nn.Parameter(p.new_empty(shape), p.requires_grad))
            experts.num_experts = sub.config.num_experts
            sub.expert_shard = None
        layer.expert_shard = None
    for module in plain.modules():
        if hasattr(module, "skip_closed"):
            module.skip_closed = True
    plain.load_state_dict(full)
    return plain


def _shard_of(model: nn.Module, param_name: str) -> ExpertShard:
    for name, layer in moe_layers(model):
        if param_name.startswith(f"{name}." if name else "") and layer.expert_shard is not None:
            return layer.expert_shard
    raise KeyError(param_name)


# ---- the exchange ---------------------------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Rows (sum(in_splits), D) -> (sum(out_splits), D) by ``all_to_all_single``; backward is the
    reverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (list(out_splits), list(in_splits)), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        dx = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of rows: send ``in_splits[j]`` rows to rank j, receive
    ``out_splits[j]`` from rank j."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange(rows: torch.Tensor, column: torch.Tensor, columns_per_rank: int, shard: ExpertShard,
             run: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """Send each row to the rank owning its column, run ``run`` there, bring the outputs back.

    rows (M, D); column (M,) int64 in ``[0, size * C)``: rank ``column // C``, local column
    ``column % C``. ``run(sorted_rows, counts)`` gets the rows received from every rank sorted by
    local column (``counts[c]`` rows of column c, every source's in rank order) and returns one
    output row each. Returns (M, D) outputs in ``rows``' order.
    """
    size, dev = shard.size, rows.device
    order = torch.argsort(column, stable=True)
    send = torch.bincount(column, minlength=size * columns_per_rank).view(size, columns_per_rank)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=shard.group)  # counts first
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    got = all_to_all_rows(rows.index_select(0, order), recv_splits, send_splits, shard.group)
    local_col = torch.arange(columns_per_rank, device=dev).repeat(size).repeat_interleave(recv.reshape(-1))
    by_col = torch.argsort(local_col, stable=True)
    out = run(got.index_select(0, by_col), recv.sum(0).tolist())
    out = out.index_select(0, torch.argsort(by_col))
    back = all_to_all_rows(out, send_splits, recv_splits, shard.group)
    return back.index_select(0, torch.argsort(order))


# ---- the sharded forward ------------------------------------------------------------------------

def ep_forward(layer: "MoEFeedForward", x: torch.Tensor, modality_ids: torch.Tensor | None,
               mask: torch.Tensor | None, routing_only: bool = False) -> "MoEOutput":
    """``layer(x, modality_ids, mask)`` with the experts spread over ``layer.expert_shard``'s group.

    x (B, L, D) or (N, D) local tokens -> MoEOutput with the local output and the EP group's global
    aux losses and statistics. ``routing_only`` still exchanges (every rank must), output zeros.
    """
    from .groups import _check_coverage, modality_group

    shard = layer.expert_shard
    assert shard is not None
    cfg = layer.config
    layer.config.check_top_k(layer.top_k)
    flat, ids, mask_flat = layer._flatten_inputs(x, modality_ids, mask)
    subs = _expert_sets(layer)
    if layer.groups is not None:
        table = modality_group(cfg).to(ids.device)
        _check_coverage(cfg, ids if mask_flat is None else ids[mask_flat], table)
        token_group = table[ids]
        index = [(token_group == g).nonzero().squeeze(1) for g in range(len(subs))]
    else:
        index = [None]
    routed = []
    for sub, idx in zip(subs, index):
        sub.top_k, sub.temperature = layer.top_k, layer.temperature
        if idx is None:
            routed.append(sub.route_tokens(flat, ids, mask_flat))
        else:
            routed.append(sub.route_tokens(flat.index_select(0, idx), ids[idx],
                                           None if mask_flat is None else mask_flat[idx]))
    outputs = _run_sharded(subs, routed, shard)
    parts = [_global_terms(sub, r, y, shard) for sub, r, y in zip(subs, routed, outputs)]
    if layer.groups is None:
        r, y = routed[0], outputs[0]
        y = r.scatter_back(y + layer.shared(r.tokens) if layer.shared is not None else y)
        out = parts[0][0]
        out.output = x.new_zeros(()).expand(x.shape) if routing_only else y.view(x.shape)
        return out
    return _combine_groups(layer, x, flat, mask_flat, index, parts, routing_only)


def _run_sharded(subs: list["MoEFeedForward"], routed: list[Any], shard: ExpertShard) -> list[torch.Tensor]:
    """Every expert set's kept assignments through one exchange -> per set (N_real, D) combined outputs."""
    local = [sub.config.num_experts // shard.size for sub in subs]
    offsets = [sum(local[:g]) for g in range(len(subs))]
    per_rank = sum(local)
    rows, columns = [], []
    for sub, r, loc, off in zip(subs, routed, local, offsets):
        expert = r.decision.experts.reshape(-1).index_select(0, r.plan.order)  # sorted rows' experts
        rows.append(r.tokens.to(sub.experts.params()[0].dtype).index_select(0, r.plan.token_index))
        columns.append(torch.div(expert, loc, rounding_mode="floor") * per_rank + off + expert % loc)
    owner = [(g, e) for g in range(len(subs)) for e in range(local[g])]

    def run(sorted_rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        chunks = sorted_rows.split(counts)
        return torch.cat([subs[g].experts.expert(chunk, e) for (g, e), chunk in zip(owner, chunks)])

    out = exchange(torch.cat(rows), torch.cat(columns), per_rank, shard, run)
    results = []
    for r, piece in zip(routed, out.split([t.shape[0] for t in rows])):
        weights = r.decision.weights
        per_token = torch.cat([piece, piece.new_zeros(1, piece.shape[1])]).index_select(0, r.plan.inverse)
        y = (weights.to(piece.dtype).unsqueeze(-1) * per_token.view(*weights.shape, piece.shape[1])).sum(1)
        results.append(y.to(r.tokens.dtype))
    return results


def global_sum(value: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """The EP group's sum of ``value``; its gradient is the local one times the group size (so the
    data-parallel mean of the ranks' gradients is the gradient of the global value)."""
    total = value.detach().clone()
    dist.all_reduce(total, group=shard.group)
    if not value.requires_grad:
        return total
    return value * shard.size + (total - value.detach() * shard.size)


def _global_terms(sub: "MoEFeedForward", r: Any, y: torch.Tensor,
                  shard: ExpertShard) -> tuple["MoEOutput", int, torch.Tensor]:
    """The sub-layer's MoEOutput around ``y`` with losses and stats over the EP group's tokens, the
    group's token count and its (NUM_MODALITIES,) tokens per modality."""
    from .layer import MoEOutput
    from .losses import load_balance_from_counts, router_orthogonal_loss

    cfg, d = sub.config, r.decision
    num_e, k, n = cfg.num_experts, sub.top_k, r.tokens.shape[0]
    ids = r.modality_ids.long()
    usage = torch.bincount((ids[:, None] * num_e + d.experts).reshape(-1), minlength=NUM_MODALITIES * num_e)
    per_mod = torch.bincount(ids, minlength=NUM_MODALITIES)[:NUM_MODALITIES]
    visual = torch.bincount(is_visual(ids).long(), minlength=2)
    entropy = torch.special.entr(d.probs.detach()).sum() if n else d.probs.new_zeros(())
    counts = torch.cat([r.plan.routed_counts, usage[: NUM_MODALITIES * num_e], per_mod, visual,
                        r.plan.routed_counts.new_tensor([n])]).double()
    counts = torch.cat([counts, entropy.double().reshape(1)])
    dist.all_reduce(counts, group=shard.group)
    routed = counts[:num_e].round().long()
    usage_g = counts[num_e:num_e + NUM_MODALITIES * num_e].float().view(NUM_MODALITIES, num_e)
    o = num_e + NUM_MODALITIES * num_e
    per_mod_g, visual_g = counts[o:o + NUM_MODALITIES].float(), counts[o + NUM_MODALITIES:o + NUM_MODALITIES + 2]
    n_g = int(counts[-2].round())
    sums = global_sum(torch.cat([d.prob_sum, d.lse.square().sum().reshape(1)]), shard)
    if sub.training:
        sub.router.record_load(routed - r.plan.routed_counts)  # the local part was recorded in routing
    group = sub.router.expert_group
    lb = load_balance_from_counts(sums[:num_e], routed, n_g, k, None if group is None else visual_g.long(), group)
    z = sums[num_e] / n_g if n_g else sums.new_zeros(())
    orth = router_orthogonal_loss(sub.router.weight)
    aux = cfg.load_balance_coef * lb + cfg.z_loss_coef * z + cfg.orthogonal_coef * orth
    total = num_e * sub.experts.params_per_expert() + sub.shared_params()
    active = (k * sub.experts.params_per_expert() + sub.shared_params()) / total if n_g else 0.0
    stats = RoutingStats(
        tokens_per_expert=routed,
        usage_by_modality=usage_g / usage_g.sum(1, keepdim=True).clamp(min=1.0),
        dropped_tokens=torch.zeros((), dtype=torch.long),
        router_entropy=(counts[-1] / max(n_g, 1)).float(),
        overlap_rate=overlap_rate(usage_g / usage_g.sum(1, keepdim=True).clamp(min=1.0), per_mod_g).float(),
        activated_param_ratio=torch.tensor(active, dtype=torch.float32),
        num_tokens=torch.tensor(n_g, dtype=torch.long),
    )
    return MoEOutput(y, r.logits, aux, lb, z, orth, stats), n_g, per_mod_g


def _combine_groups(layer: "MoEFeedForward", x: torch.Tensor, flat: torch.Tensor, mask_flat: torch.Tensor | None,
                    index: list[torch.Tensor], parts: list[tuple["MoEOutput", int, torch.Tensor]],
                    routing_only: bool) -> "MoEOutput":
    """Groups mode: scatter each group's outputs back, add the shared experts, and combine the groups'
    global terms (token shares over the EP group's batch) as :func:`ernie_vl.moe.groups._combine` does."""
    from .groups import _combine, add_shared

    cfg = layer.config
    width = max(cfg.group_experts or (1,))
    logits = flat.new_full((flat.shape[0], width), float("-inf"), dtype=torch.float32)
    out = flat.new_zeros(flat.shape)
    present = []
    for g, ((res, n_g, per_mod), idx) in enumerate(zip(parts, index)):
        logits[idx, : layer.groups[g].num_experts] = res.router_logits  # type: ignore[index]
        out = out.index_copy(0, idx, _scatter_group(res.output, idx, mask_flat))
        if n_g:  # the group has tokens somewhere in the EP group
            present.append((g, per_mod, res))
    y = x.new_zeros(()).expand(x.shape) if routing_only else add_shared(layer, out, flat, mask_flat).view(x.shape)
    return _combine(layer, y, logits, present, sum(n_g for _, n_g, _ in parts))


def _scatter_group(y: torch.Tensor, idx: torch.Tensor, mask_flat: torch.Tensor | None) -> torch.Tensor:
    """A group's (N_real_g, D) outputs -> one row per token of the group (``idx``), zeros at padding."""
    if mask_flat is None:
        return y
    real = mask_flat[idx].nonzero().squeeze(1)
    if real.numel() == idx.numel():
        return y
    return y.new_zeros(idx.numel(), y.shape[1]).index_copy(0, real, y)
