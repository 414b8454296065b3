"""Dynamic attention-head gating (BRIEF #1).

Each gated attention layer computes one gate per sample and head from the mean of
its (normed) input tokens: ``gate = 2 * sigmoid(W @ mean(x) + b)``. ``W`` and ``b``
start at zero, so every gate starts at exactly 1.0 and a gated encoder built from
plain ViT weights starts as that plain ViT. A head is *active* when its gate is
at least ``threshold`` and, with ``topk`` set, it is among the ``topk`` strongest
heads of its sample; inactive heads are dropped (their output is zero and, in
``MultiHeadAttention.forward_selected``, never computed). Which heads and how many
stay active therefore depends on the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class HeadGateOutput:
    """gate: (B, H) multipliers; keep: (B, H) bool active heads; active_ratio: scalar."""

    gate: torch.Tensor
    keep: torch.Tensor
    active_ratio: torch.Tensor

    def expand(self, group: int) -> "HeadGateOutput":
        """Repeat each sample's row ``group`` times (one row per frame of a clip)."""
        if group == 1:
            return self
        return HeadGateOutput(
            self.gate.repeat_interleave(group, dim=0),
            self.keep.repeat_interleave(group, dim=0),
            self.active_ratio,
        )


class HeadGate(nn.Module):
    """Per-sample, per-head gates from mean-pooled tokens.

    Args:
        dim: token width C.
        num_heads: heads H of the gated attention.
        topk: keep only the k strongest heads per sample (None: no limit).
        threshold: heads whose gate is below it are dropped (0.0: none by threshold).
    ``forward(x (B, L, C))`` -> HeadGateOutput with (B, H) tensors.
    """

    def __init__(self, dim: int, num_heads: int, topk: int | None = None, threshold: float = 0.0) -> None:
        super().__init__()
        if topk is not None and not 1 <= topk <= num_heads:
            raise ValueError(f"head_topk must be in [1, {num_heads}] (the number of heads), got {topk}")
        if not 0.0 <= threshold < 2.0:
            raise ValueError(f"gate_threshold must be in [0, 2) (gates lie in (0, 2)), got {threshold}")
        self.num_heads = num_heads
        self.topk = topk
        self.threshold = threshold
        self.proj = nn.Linear(dim, num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero weights and bias: every gate is exactly 1.0."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> HeadGateOutput:
        summary = x.mean(dim=1)
        gate = 2.0 * torch.sigmoid(self.proj(summary))
        keep = gate >= self.threshold
        if self.topk is not None and self.topk < self.num_heads:
            top = gate.detach().topk(self.topk, dim=-1).indices
            in_top = torch.zeros_like(keep).scatter_(1, top, True)
            keep = keep & in_top
        return HeadGateOutput(gate=gate, keep=keep, active_ratio=keep.float().mean())
