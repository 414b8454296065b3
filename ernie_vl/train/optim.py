"""AdamW with parameter groups and a cosine schedule with linear warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn

_NO_DECAY_NAME_PARTS = ("bias", "norm", "ln_", "embed", "embedding", "logit_scale", "logit_bias",
                        "pos_", "cls_token", "class_token", "queries")


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, embeddings, learned queries and the logit scale/bias get no weight decay."""
    lowered = name.lower()
    return param.ndim < 2 or any(part in lowered for part in _NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices with ``weight_decay``; the rest (see :func:`_no_decay`) with 0."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98),
                    eps: float = 1e-6) -> torch.optim.AdamW:
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    # foreach=True: one fused multi-tensor update per group instead of a Python loop per parameter
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=True)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step``: linear 0->1 over warm-up, then cosine 1->min_ratio at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / max(warmup_steps, 1)
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup_steps, total_steps, min_ratio))
