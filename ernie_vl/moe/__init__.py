"""Mixture-of-experts feed-forward layers for the shared backbone.

``MoEFeedForward`` routes each token to its top-k experts (sort-based dropless or
capacity dispatch), returns ``MoEOutput`` with the auxiliary losses and ``RoutingStats``.
"""
from __future__ import annotations

from .config import MoEConfig
from .curriculum import ExpertCurriculum
from .experts import DenseMLP, DenseSwiGLU, MLPExperts, SwiGLUExperts
from .layer import MoEFeedForward, MoEOutput
from .stats import RoutingStats

__all__ = [
    "DenseMLP",
    "DenseSwiGLU",
    "ExpertCurriculum",
    "MLPExperts",
    "MoEConfig",
    "MoEFeedForward",
    "MoEOutput",
    "RoutingStats",
    "SwiGLUExperts",
]
