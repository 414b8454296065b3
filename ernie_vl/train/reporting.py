"""Plain-number records for the training log: routing statistics of a forward, tensors as numbers."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch


def routing_summary(routing: list[Any], active_head_ratio: Any = None) -> dict[str, Any]:
    """Plain-number routing statistics of one forward: per layer, and averaged over MoE layers."""
    layers = [r.to_dict() for r in routing or []]
    summary: dict[str, Any] = {"layers": layers}
    if layers:
        def mean(key: str) -> Optional[float]:
            vals = [l[key] for l in layers if l.get(key) is not None]
            return float(np.mean(vals)) if vals else None

        summary.update(overlap_rate=mean("overlap_rate"), activated_param_ratio=mean("activated_param_ratio"),
                       router_entropy=mean("router_entropy"),
                       usage_by_modality=np.mean([l["usage_by_modality"] for l in layers], axis=0).tolist())
    if active_head_ratio is not None:
        summary["active_head_ratio"] = plain_numbers(active_head_ratio)
    return summary


def plain_numbers(value: Any) -> Any:
    """Tensors (in dicts and lists too) as Python numbers and lists, for JSON logs."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_numbers(v) for v in value]
    return value
