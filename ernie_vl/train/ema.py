"""An exponential moving average of a model's weights (evaluated and saved in their place).

``ModelEMA(model, decay)``; ``update(model)`` after every optimiser step (the decay warms up as
``min(decay, (1 + n) / (10 + n))`` so the average is not dominated by the random start);
``swapped(model)`` is a context manager that puts the averaged weights into the model and
restores the trained ones afterwards. ``state_dict`` / ``load_state_dict`` for exact resume.

What is averaged: the trainable parameters and the floating-point buffers (BatchNorm running
means and variances, e.g. in a convolutional video tokenizer). Averaging the buffers too keeps
normalisation statistics that match the averaged weights: the live model's statistics belong to
the live weights, and evaluating averaged convolutions with them normalises activations by the
wrong mean and variance. Integer buffers (BatchNorm's batch counter) are left as they are.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def _averaged(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of what the EMA follows: trainable parameters, then floating-point buffers."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p
    for name, b in model.named_buffers():
        if b.is_floating_point():
            yield name, b


class ModelEMA:
    """Float32 shadow copies of ``model``'s trainable parameters and floating buffers, by name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in _averaged(model)}
        self.buffer_names = {name for name, b in model.named_buffers() if name in self.shadow}
        self.stale: set[str] = set()  # buffers a resumed state lacked: taken from the model at the next use

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for name, t in _averaged(model):
            if name in self.stale:
                self.shadow[name].copy_(t.detach().float())
            elif name in self.shadow:
                self.shadow[name].lerp_(t.detach().float(), 1.0 - d)
        self.stale.clear()

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights (and buffers) in ``model`` inside the block; the trained ones back afterwards."""
        tensors = dict(_averaged(model))
        saved = {name: tensors[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                if name not in self.stale:
                    tensors[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    tensors[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact resume. A state saved before buffers were averaged lacks them: they restart from the
        model's current buffers (those of the resumed model) at the next update; a missing parameter is an
        error."""
        absent = set(self.shadow) - set(state["shadow"])
        missing = sorted(absent - self.buffer_names)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.stale = absent & self.buffer_names
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name in self.shadow:
            if name in state["shadow"]:
                self.shadow[name].copy_(state["shadow"][name])
