"""Helpers for the int8 and closed-gate shortcut tests: compare backbone outputs field by field."""
from __future__ import annotations

import dataclasses

import torch

from ernie_vl.backbone import BackboneOutput


def assert_same_backbone_output(fast: BackboneOutput, slow: BackboneOutput) -> None:
    """Bit-identical hidden states, losses, router logits and routing statistics (NaN == NaN)."""
    assert torch.equal(fast.hidden, slow.hidden)
    for name in ("aux_loss", "load_balance_loss", "z_loss", "orthogonal_loss", "activated_param_ratio"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert len(fast.router_logits) == len(slow.router_logits) > 0
    for a, b in zip(fast.router_logits, slow.router_logits):
        assert torch.equal(a, b)
    assert len(fast.layer_stats) == len(slow.layer_stats)
    for a, b in zip(fast.layer_stats, slow.layer_stats):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if x is None or y is None:
                assert x is None and y is None, field.name
                continue
            assert torch.equal(x.nan_to_num(-1.0), y.nan_to_num(-1.0)), field.name


class CallCounter:
    """Counts forward calls of the modules it is attached to."""

    def __init__(self, modules) -> None:
        self.calls = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_) -> None:
        self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
