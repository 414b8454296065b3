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
    groups = param_groups(model, weight_decay)
    # fused: one kernel per group that reads each state tensor once (on CPU faster than foreach for
    # the `tiny` preset, whose 49408 x 128 token table dominates); foreach where fused is not
    # available for these tensors (e.g. float64 or an unsupported device).
    params = [p for g in groups for p in g["params"]]
    fusable = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params) and \
        len({p.device.type for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    if fusable:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step``: linear 0->1 over warm-up, then cosine 1->min_ratio at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / max(warmup_steps, 1)
    progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RefittableCosine:
    """Warm-up then cosine whose length can be re-fitted mid-run without a jump in the LR.

    ``factor(step)`` is the LR multiplier. Until the first :meth:`refit` it equals
    ``cosine_with_warmup(step, warmup_steps, total_steps, min_ratio)``. ``refit(step,
    total_steps)`` keeps the cosine *progress* reached at ``step`` and spreads the rest of
    it evenly over the steps up to the new ``total_steps``: the multiplier is continuous
    in the step and never increases after warm-up, however often the length changes (a
    time budget on a machine whose speed varies). ``state_dict`` / ``load_state_dict``
    make it resumable.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.anchor_step, self.anchor_progress = warmup_steps, 0.0

    def progress(self, step: int) -> float:
        """Cosine progress in [0, 1] at ``step`` (0 during warm-up)."""
        if step <= self.anchor_step:
            return self.anchor_progress if step >= self.warmup_steps else 0.0
        span = max(self.total_steps - self.anchor_step, 1)
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * (step - self.anchor_step) / span)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / max(self.warmup_steps, 1)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def refit(self, step: int, total_steps: int) -> None:
        """From ``step`` on, reach the end of the cosine at ``total_steps`` (at least ``step``: a
        length already reached, or inside the warm-up, just ends the run there)."""
        anchor = max(step, self.warmup_steps)
        self.anchor_progress, self.anchor_step = self.progress(anchor), anchor
        self.total_steps = max(int(total_steps), step)

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "anchor_step": self.anchor_step,
                "anchor_progress": self.anchor_progress}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps = state["total_steps"]
        self.anchor_step, self.anchor_progress = state["anchor_step"], state["anchor_progress"]
