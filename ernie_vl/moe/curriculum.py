"""Expert curriculum (BRIEF #4): routing starts dense and anneals to top-k.

Choice made here (of the options in issue 3): **top-k annealing**. For the first
``hold_steps`` steps every token goes to every expert it may use (top-k = E, or the
group size with isolated routing); the renormalised top-k weights are then the full
softmax, so the layer is a soft mixture and every expert learns the common, "easy"
part of the task. Over the next ``anneal_steps`` steps k falls linearly (rounded)
to each layer's configured top-k, so the assignment increasingly follows the router,
i.e. the loss. Cost: while k is large each token runs k experts (k x the expert FLOPs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .layer import MoEFeedForward


@dataclass
class ExpertCurriculum:
    """Dense-to-sparse top-k schedule; ``apply(module, step)`` sets ``top_k`` on every MoE layer.

    start_top_k: k at the start; None = every expert a token may use.
    end_top_k: k after annealing; None = each layer's configured ``config.top_k``.
    hold_steps: steps kept at ``start_top_k``.
    anneal_steps: steps of the linear anneal from start to end (0 = jump).
    """

    start_top_k: int | None = None
    end_top_k: int | None = None
    hold_steps: int = 0
    anneal_steps: int = 1000

    def __post_init__(self) -> None:
        if self.hold_steps < 0 or self.anneal_steps < 0:
            raise ValueError(f"hold_steps and anneal_steps must be >= 0, got {self.hold_steps}, {self.anneal_steps}")
        for name in ("start_top_k", "end_top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    def progress(self, step: int) -> float:
        """0 before/at the end of the hold, 1 once annealed."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.hold_steps:
            return 0.0
        if self.anneal_steps == 0:
            return 1.0
        return min(1.0, (step - self.hold_steps) / self.anneal_steps)

    def top_k_at(self, step: int, layer: MoEFeedForward) -> int:
        """The k ``layer`` should use at ``step`` (clamped to what its routing allows)."""
        most = min(layer.config.group_sizes())
        start = most if self.start_top_k is None else min(self.start_top_k, most)
        end = layer.config.top_k if self.end_top_k is None else min(self.end_top_k, most)
        k = start + (end - start) * self.progress(step)
        return int(math.floor(k + 0.5))

    def apply(self, module: nn.Module, step: int) -> dict[str, int]:
        """Set ``top_k`` on every :class:`MoEFeedForward` inside ``module``; returns name -> k."""
        applied: dict[str, int] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, MoEFeedForward):
                sub.top_k = self.top_k_at(step, sub)
                applied[name] = sub.top_k
        return applied
