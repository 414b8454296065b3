"""Modality groups (ERNIE 4.5 VL): one expert group per modality family, each with its own router.

In ``routing="groups"`` an :class:`~ernie_vl.moe.MoEFeedForward` holds one sub-layer per entry of
``group_layout`` (by default ``text`` and ``vision`` = image + video). Each sub-layer is an ordinary
shared-routing ``MoEFeedForward`` with its own router, expert count and hidden width (ERNIE 4.5 VL:
``moe_intermediate_size = [text, vision]``) and sees only the tokens of its family; the layer's
shared experts run on every token. Unlike ``isolated`` routing (one router masked over one pool of
equal-width experts) the groups share nothing but the shared experts.

Global expert ids are the groups' experts side by side: group g's expert e is
``offset_g + e`` in ``RoutingStats.tokens_per_expert`` / ``usage_by_modality``;
``RoutingStats.expert_group`` (E,) names each expert's group. ``router_logits`` is (N, max E_g):
row n holds the logits of token n's group in its first E_g columns and ``-inf`` after them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..modality import NAMES, NUM_MODALITIES
from .config import GROUP_FAMILIES, MoEConfig
from .stats import RoutingStats, overlap_rate

if TYPE_CHECKING:
    from .layer import MoEFeedForward, MoEOutput

_GROUP_ONLY = ("routing", "group_layout", "group_experts", "group_hidden", "num_text_experts",
               "num_shared_experts", "hidden", "num_experts")


def build_groups(d_model: int, cfg: MoEConfig) -> nn.ModuleList:
    """One shared-routing sub-layer per group of ``cfg.group_layout`` (no shared experts of their own)."""
    from .layer import MoEFeedForward

    options = {k: v for k, v in cfg.to_dict().items() if k not in _GROUP_ONLY}
    assert cfg.group_experts is not None and cfg.group_hidden is not None
    return nn.ModuleList(
        MoEFeedForward(d_model, hidden=h, num_experts=e, routing="shared", **options)
        for e, h in zip(cfg.group_experts, cfg.group_hidden)
    )


def modality_group(cfg: MoEConfig) -> torch.Tensor:
    """(NUM_MODALITIES,) int64: the group of each modality, -1 where no group takes it."""
    table = torch.full((NUM_MODALITIES,), -1, dtype=torch.long)
    for g, name in enumerate(cfg.group_layout):
        table[list(GROUP_FAMILIES[name])] = g
    return table


def expert_group_ids(cfg: MoEConfig) -> torch.Tensor:
    """(E,) int64 group index of every expert, in global expert order."""
    assert cfg.group_experts is not None
    return torch.repeat_interleave(torch.arange(len(cfg.group_experts)), torch.tensor(cfg.group_experts))


def _check_coverage(cfg: MoEConfig, ids: torch.Tensor, table: torch.Tensor) -> None:
    present = torch.bincount(ids, minlength=NUM_MODALITIES)[:NUM_MODALITIES]
    missing = [m for m in range(NUM_MODALITIES) if present[m] > 0 and table[m] < 0]
    if missing:
        layout = ", ".join(f"{name} ({e} experts)" for name, e in zip(cfg.group_layout, cfg.group_experts or ()))
        found = ", ".join(f"{NAMES[m]} ({int(present[m])} tokens)" for m in missing)
        raise ValueError(f"group_layout covers no group for {found} in this batch; groups: {layout}; "
                         f"valid families: {', '.join(GROUP_FAMILIES)}")


def grouped_forward(layer: "MoEFeedForward", x: torch.Tensor, modality_ids: torch.Tensor | None,
                    mask: torch.Tensor | None, routing_only: bool = False) -> "MoEOutput":
    """``layer(x, modality_ids, mask)`` for ``routing="groups"``: each group's sub-layer on its tokens,
    outputs scattered back, shared experts on every real token; losses token-weighted over groups."""
    assert layer.groups is not None
    cfg = layer.config
    flat, ids, mask_flat = layer._flatten_inputs(x, modality_ids, mask)
    table = modality_group(cfg).to(ids.device)
    real_ids = ids if mask_flat is None else ids[mask_flat]
    _check_coverage(cfg, real_ids, table)
    token_group = table[ids]
    n_real = real_ids.numel()
    width = max(cfg.group_experts or (1,))
    logits = flat.new_full((flat.shape[0], width), float("-inf"), dtype=torch.float32)
    out = flat.new_zeros(flat.shape) if not routing_only else None
    parts: list[tuple[int, torch.Tensor, "MoEOutput"]] = []
    for g, sub in enumerate(layer.groups):
        index = (token_group == g).nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        sub.top_k, sub.temperature = layer.top_k, layer.temperature
        sub_mask = None if mask_flat is None else mask_flat[index]
        tokens = flat.index_select(0, index)
        res = sub.routing_output(tokens, ids[index], sub_mask) if routing_only else sub(tokens, ids[index], sub_mask)
        logits[index, : sub.num_experts] = res.router_logits
        if out is not None:
            out = out.index_copy(0, index, res.output)
        real_g = ids[index] if sub_mask is None else ids[index][sub_mask]
        parts.append((g, torch.bincount(real_g, minlength=NUM_MODALITIES)[:NUM_MODALITIES].float(), res))
    y = x.new_zeros(()).expand(x.shape) if out is None else add_shared(layer, out, flat, mask_flat).view(x.shape)
    return _combine(layer, y, logits, parts, n_real)


def add_shared(layer: "MoEFeedForward", out: torch.Tensor, flat: torch.Tensor,
               mask_flat: torch.Tensor | None) -> torch.Tensor:
    """(N, D) routed outputs plus the layer's shared experts on the real tokens of ``flat`` (N, D)."""
    if layer.shared is None:
        return out
    shared = layer.shared(flat)
    return out + (shared if mask_flat is None else shared * mask_flat[:, None].to(shared.dtype))


def _combine(layer: "MoEFeedForward", y: torch.Tensor, logits: torch.Tensor,
             parts: list[tuple[int, torch.Tensor, "MoEOutput"]], n_real: int) -> "MoEOutput":
    """The layer's MoEOutput from its groups' ``(group, tokens per modality (NUM_MODALITIES,), output)``:
    losses weighted by each group's share of real tokens (the orthogonal loss averaged over every
    group's router), statistics over global expert ids."""
    from .layer import MoEOutput

    cfg = layer.config
    zero = logits.new_zeros(())
    lb = z = zero
    for _, _, res in parts:
        share = float(res.stats.num_tokens) / max(n_real, 1)
        lb, z = lb + share * res.load_balance_loss, z + share * res.z_loss
    orth = torch.stack([_orthogonal(sub) for sub in layer.groups]).mean()  # type: ignore[union-attr]
    aux = cfg.load_balance_coef * lb + cfg.z_loss_coef * z + cfg.orthogonal_coef * orth
    stats = combine_group_stats(layer, parts, n_real)
    groups = {f"{g}:{cfg.group_layout[g]}": res for g, _, res in parts}
    return MoEOutput(y, logits, aux, lb, z, orth, stats, groups)


def _orthogonal(sub: "MoEFeedForward") -> torch.Tensor:
    from .losses import router_orthogonal_loss

    return router_orthogonal_loss(sub.router.weight)


@torch.no_grad()
def combine_group_stats(layer: "MoEFeedForward", parts: list[tuple[int, torch.Tensor, "MoEOutput"]],
                        n_real: int) -> RoutingStats:
    """One RoutingStats over all groups' experts (global ids: the groups side by side); ``parts`` as in
    :func:`_combine`."""
    cfg = layer.config
    sizes = list(cfg.group_experts or ())
    offsets = [sum(sizes[:g]) for g in range(len(sizes))]
    total_e = sum(sizes)
    tokens_per_expert = torch.zeros(total_e, dtype=torch.long)
    usage = torch.zeros(NUM_MODALITIES, total_e)
    per_modality = torch.zeros(NUM_MODALITIES)
    dropped = torch.zeros((), dtype=torch.long)
    entropy = torch.zeros(())
    active = 0.0
    for g, modality_counts, res in parts:
        s, lo, hi = res.stats, offsets[g], offsets[g] + sizes[g]
        n = float(s.num_tokens)
        tokens_per_expert[lo:hi] = s.tokens_per_expert.cpu()
        counts = modality_counts.cpu().float()
        usage[:, lo:hi] = s.usage_by_modality.cpu().float() * (counts[:, None] > 0)
        per_modality += counts
        dropped += s.dropped_tokens.cpu()
        entropy += n * s.router_entropy.cpu()
        sub = layer.groups[g]  # type: ignore[index]
        active += n * float(s.activated_param_ratio) * sub.expert_params()
    total_params = layer.expert_params()
    ratio = (active / max(n_real, 1) + layer.shared_params()) / max(total_params, 1) if n_real else 0.0
    return RoutingStats(
        tokens_per_expert=tokens_per_expert,
        usage_by_modality=usage,
        dropped_tokens=dropped,
        router_entropy=(entropy / max(n_real, 1)).float(),
        overlap_rate=overlap_rate(usage, per_modality).float(),
        activated_param_ratio=torch.tensor(ratio, dtype=torch.float32),
        num_tokens=torch.tensor(n_real, dtype=torch.long),
        expert_group=expert_group_ids(cfg),
    )


def group_loss_parts(cfg: MoEConfig, passes: list[tuple[int, object]]) -> dict[str, torch.Tensor]:
    """Per-group unweighted losses for logging, from single-modality backbone passes ``(modality, out)``
    (``out`` with ``load_balance_loss`` / ``z_loss``): ``"load_balance/<family>"`` and ``"z_loss/<family>"``,
    each the mean over the passes whose modality that group takes (detached)."""
    table = modality_group(cfg).tolist()
    parts: dict[str, torch.Tensor] = {}
    for g, name in enumerate(cfg.group_layout):
        mine = [out for m, out in passes if table[m] == g]
        if mine:
            parts[f"load_balance/{name}"] = (sum(o.load_balance_loss for o in mine) / len(mine)).detach()
            parts[f"z_loss/{name}"] = (sum(o.z_loss for o in mine) / len(mine)).detach()
    return parts
