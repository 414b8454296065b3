"""Top-k router: float32 linear -> (masked) softmax -> top-k -> renormalised weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modality import is_visual


@dataclass
class RouterDecision:
    """Routing of N tokens among E experts.

    logits: (N, E) float32 raw router logits (before the modality mask).
    masked_logits: (N, E) float32, ``-inf`` where a token may not go (isolated routing).
    probs: (N, E) float32 softmax of ``masked_logits``.
    weights: (N, k) float32 top-k probabilities renormalised to sum to 1.
    experts: (N, k) int64 chosen experts, best first.
    """

    logits: torch.Tensor
    masked_logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor


class Router(nn.Module):
    """Linear router without bias, weight (E, D), always computed in float32.

    ``expert_group`` (E,) int: the routing group of each expert (0 = text, 1 = visual)
    when routing is isolated, else None (every token may go anywhere).
    """

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0,
                 num_text_experts: int | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        if num_text_experts is None:
            self.expert_group: torch.Tensor | None = None
        else:
            group = (torch.arange(num_experts) >= num_text_experts).long()
            self.register_buffer("expert_group", group, persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) float32 logits; jitter noise on the input in training."""
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x, self.weight.float())

    def allowed(self, modality_ids: torch.Tensor) -> torch.Tensor | None:
        """(N,) modality ids -> (N, E) bool, True where the token may go; None if unrestricted."""
        if self.expert_group is None:
            return None
        token_group = is_visual(modality_ids).long()
        return token_group[:, None] == self.expert_group[None, :]

    def route(self, logits: torch.Tensor, top_k: int, modality_ids: torch.Tensor | None = None,
              temperature: float = 1.0) -> RouterDecision:
        """Choose ``top_k`` experts per token from (N, E) float32 logits."""
        masked = logits
        if self.expert_group is not None:
            if modality_ids is None:
                raise ValueError("isolated routing needs modality_ids (TEXT=0, IMAGE=1, VIDEO=2)")
            masked = logits.masked_fill(~self.allowed(modality_ids), float("-inf"))
        scaled = masked if temperature == 1.0 else masked / temperature
        probs = scaled.softmax(dim=-1)
        # top-k of the logits = top-k of the probabilities; the renormalised top-k
        # probabilities are the softmax over the k chosen logits (small (N, k) ops)
        top_logits, experts = scaled.topk(top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return RouterDecision(logits, masked, probs, weights, experts)
