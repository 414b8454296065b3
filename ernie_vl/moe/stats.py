"""Routing statistics of one MoE layer: loads, per-modality usage, overlap, active parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..modality import NUM_MODALITIES, TEXT


@dataclass
class RoutingStats:
    """What the router did on one batch (detached tensors; padding excluded).

    tokens_per_expert: (E,) int64 assignments routed to each expert (before capacity drops).
    usage_by_modality: (NUM_MODALITIES, E) float32, row m = fraction of modality m's
        assignments that went to each expert (rows of absent modalities are zero).
    dropped_tokens: () int64 token-to-expert assignments dropped for capacity (0 when dropless).
    router_entropy: () float32 mean entropy (nats) of the routing distribution per token.
    overlap_rate: () float32 expert overlap between text and vision: the histogram
        intersection ``sum_e min(u_text[e], u_visual[e])`` of the text usage distribution and
        the pooled image+video usage distribution (1 = identical use, 0 = disjoint experts;
        NaN when the batch lacks text or visual tokens).
    activated_param_ratio: () float32 expert parameters used per token (kept routed
        assignments per token x params per expert + shared experts) over all expert
        parameters of the layer (routed + shared).
    num_tokens: () int64 real (non-padding) tokens routed.
    expert_group: (E,) int64 group of each expert in ``routing="groups"`` (see
        :mod:`ernie_vl.moe.groups`), else None.
    """

    tokens_per_expert: torch.Tensor
    usage_by_modality: torch.Tensor
    dropped_tokens: torch.Tensor
    router_entropy: torch.Tensor
    overlap_rate: torch.Tensor
    activated_param_ratio: torch.Tensor
    num_tokens: torch.Tensor
    expert_group: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain floats / ints / lists for JSON logs (NaN -> None)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            value = value.detach().cpu()
            py = value.tolist()
            if isinstance(py, float) and math.isnan(py):
                py = None
            out[f.name] = py
        return out


def usage_by_modality(experts: torch.Tensor, modality_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, k) choices, (N,) modality ids -> (NUM_MODALITIES, E) usage fractions."""
    flat = (modality_ids.long()[:, None] * num_experts + experts).reshape(-1)
    counts = torch.bincount(flat, minlength=NUM_MODALITIES * num_experts)[: NUM_MODALITIES * num_experts]
    counts = counts.view(NUM_MODALITIES, num_experts).float()
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)


def overlap_rate(usage: torch.Tensor, counts_by_modality: torch.Tensor) -> torch.Tensor:
    """Histogram intersection of text usage and pooled visual usage; NaN if either is absent."""
    text_n = counts_by_modality[TEXT]
    visual = [m for m in range(NUM_MODALITIES) if m != TEXT]
    visual_n = counts_by_modality[visual].sum()
    if text_n == 0 or visual_n == 0:
        return torch.tensor(float("nan"))
    visual_usage = (usage[visual] * counts_by_modality[visual, None]).sum(0) / visual_n
    return torch.minimum(usage[TEXT], visual_usage).sum()


@torch.no_grad()
def compute_routing_stats(probs: torch.Tensor, experts: torch.Tensor, modality_ids: torch.Tensor,
                          routed_counts: torch.Tensor, dropped: torch.Tensor, params_per_expert: int,
                          shared_params: int) -> RoutingStats:
    """Statistics of one routing decision over the real tokens.

    probs (N, E), experts (N, k), modality_ids (N,), routed_counts (E,), dropped ().
    """
    n, num_experts = probs.shape
    usage = usage_by_modality(experts, modality_ids, num_experts)
    per_modality = torch.bincount(modality_ids.long(), minlength=NUM_MODALITIES)[:NUM_MODALITIES]
    entropy = torch.special.entr(probs).sum(-1).mean() if n else probs.new_zeros(())
    kept_per_token = (experts.numel() - float(dropped)) / max(n, 1)
    total = num_experts * params_per_expert + shared_params
    active = (kept_per_token * params_per_expert + shared_params) / total if n else 0.0
    return RoutingStats(
        tokens_per_expert=routed_counts.detach().clone(),
        usage_by_modality=usage,
        dropped_tokens=dropped.detach().clone().long(),
        router_entropy=entropy.detach().float(),
        overlap_rate=overlap_rate(usage, per_modality).float(),
        activated_param_ratio=torch.tensor(active, dtype=torch.float32),
        num_tokens=torch.tensor(n, dtype=torch.long),
    )
