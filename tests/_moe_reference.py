"""Naive reference MoE for tests: every expert on every token with plain autograd ops."""
from __future__ import annotations

import torch

from ernie_vl.moe import MoEFeedForward


def reference_moe(layer: MoEFeedForward, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) -> (N, D): sum_j w_nj * expert_{e_nj}(x_n) [+ shared(x_n)].

    keep: optional (N, k) bool of kept assignments (capacity mode).
    """
    logits = layer.router.logits(x)
    decision = layer.router.route(logits, layer.top_k, modality_ids, layer.temperature)
    all_out = torch.stack([layer.experts.expert(x, e) for e in range(layer.num_experts)])  # (E, N, D)
    n = torch.arange(x.shape[0])
    out = torch.zeros_like(x)
    for j in range(decision.experts.shape[1]):
        w = decision.weights[:, j, None].to(x.dtype)
        if keep is not None:
            w = w * keep[:, j, None].to(x.dtype)
        out = out + w * all_out[decision.experts[:, j], n]
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out


def small_layer(**kw) -> MoEFeedForward:
    """A d_model 16, 4-expert top-2 layer whose router is sharp enough (std 0.5) to route unevenly."""
    opts = dict(hidden=24, num_experts=4, top_k=2)
    opts.update(kw)
    layer = MoEFeedForward(16, **opts)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
    return layer
