"""An exponential moving average of a model's trainable weights (evaluated and saved in their place).

``ModelEMA(model, decay)``; ``update(model)`` after every optimiser step (the decay warms up as
``min(decay, (1 + n) / (10 + n))`` so the average is not dominated by the random start);
``swapped(model)`` is a context manager that puts the averaged weights into the model and
restores the trained ones afterwards. ``state_dict`` / ``load_state_dict`` for exact resume.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


class ModelEMA:
    """Float32 shadow copies of ``model``'s trainable parameters, by name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in ``model`` inside the block; the trained ones back afterwards."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name in self.shadow:
            self.shadow[name].copy_(state["shadow"][name])
