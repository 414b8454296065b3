"""Small MoE layers for tests, and the layer's own reference dispatch as the expected output."""
from __future__ import annotations

import torch

from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.router import Router


def small_layer(**kw) -> MoEFeedForward:
    """A d_model 16, 4-expert top-2 layer whose router is sharp enough (std 0.5) to route unevenly."""
    opts = dict(hidden=24, num_experts=4, top_k=2)
    opts.update(kw)
    layer = MoEFeedForward(16, **opts)
    with torch.no_grad():
        for router in (m for m in layer.modules() if isinstance(m, Router)):  # every group's router too
            router.weight.normal_(std=0.5)
    return layer


def reference_output(layer: MoEFeedForward, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x, modality_ids, mask).output`` on the reference dispatch (the spec of every kernel)."""
    saved = layer.backend
    layer.backend = "reference"
    try:
        return layer(x, modality_ids, mask).output
    finally:
        layer.backend = saved


def kept_assignments(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """(N, k) bool: which of each token's k assignments the layer's dispatch plan keeps."""
    plan = layer.route_tokens(x, None, None).plan
    return (plan.inverse < plan.token_index.shape[0]).view(x.shape[0], -1)
