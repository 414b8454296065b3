"""Top-k router: float32 linear -> (masked) softmax -> top-k -> renormalised weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modality import is_visual
from .threaded import single_threaded


@dataclass
class RouterDecision:
    """Routing of N tokens among E experts.

    logits: (N, E) float32 raw router logits (before the modality mask).
    masked_logits: (N, E) float32, ``-inf`` where a token may not go (isolated routing).
    probs: (N, E) float32 softmax of ``masked_logits`` (divided by the temperature).
    weights: (N, k) float32 top-k probabilities renormalised to sum to 1.
    experts: (N, k) int64 chosen experts, best first.
    lse: (N,) float32 ``logsumexp(masked_logits)`` (for the z-loss), or None.
    prob_sum: (E,) float32 ``probs.sum(0)`` (for the load-balancing loss), or None.
    """

    logits: torch.Tensor
    masked_logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor
    lse: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None


class _RouterLinear(torch.autograd.Function):
    """``x @ w.T`` (N, D) x (E, D) -> (N, E), forward and backward with one intra-op thread."""

    @staticmethod
    def forward(ctx, x, w):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        with single_threaded():
            return x @ w.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        dx = dw = None
        with single_threaded():
            if ctx.needs_input_grad[0]:
                dx = grad @ w
            if ctx.needs_input_grad[1]:
                dw = grad.t() @ x
        return dx, dw


class _Routing(torch.autograd.Function):
    """(N, E) logits -> masked logits, probs, top-k weights and experts, logsumexp, probs.sum(0),
    forward and backward (closed form) with one intra-op thread: the same values and gradients
    as :meth:`Router.route` plus ``torch.logsumexp`` and ``sum``, in a handful of small ops."""

    @staticmethod
    def forward(ctx, logits, allowed, temperature, top_k):  # type: ignore[override]
        with single_threaded():
            masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
            scaled = masked if temperature == 1.0 else masked / temperature
            probs = scaled.softmax(dim=-1)
            top_logits, experts = scaled.topk(top_k, dim=-1)
            weights = top_logits.softmax(dim=-1)
            lse = torch.logsumexp(masked, dim=-1)
            prob_sum = probs.sum(0)
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(probs, weights, experts, masked, lse, allowed)
        ctx.temperature = temperature
        return masked, probs, weights, experts, lse, prob_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_masked, d_probs, d_weights, _d_experts, d_lse, d_prob_sum):  # type: ignore[override]
        probs, weights, experts, masked, lse, allowed = ctx.saved_tensors
        temperature = ctx.temperature
        with single_threaded():
            dp = d_probs + d_prob_sum  # prob_sum = probs.sum(0)
            ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))  # softmax backward
            d_top = weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True))
            ds.scatter_add_(1, experts, d_top)  # top-k: gather backward
            if temperature != 1.0:
                ds.div_(temperature)
            soft = probs if temperature == 1.0 else torch.exp(masked - lse[:, None])  # softmax(masked)
            ds.add_(soft * d_lse[:, None]).add_(d_masked)
            if allowed is not None:
                ds.masked_fill_(~allowed, 0.0)
        return ds, None, None, None


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
        return _RouterLinear.apply(x, self.weight.float())

    def allowed(self, modality_ids: torch.Tensor) -> torch.Tensor | None:
        """(N,) modality ids -> (N, E) bool, True where the token may go; None if unrestricted."""
        if self.expert_group is None:
            return None
        token_group = is_visual(modality_ids).long()
        return token_group[:, None] == self.expert_group[None, :]

    def route_fused(self, logits: torch.Tensor, top_k: int, modality_ids: torch.Tensor | None = None,
                    temperature: float = 1.0) -> RouterDecision:
        """:meth:`route` plus ``lse`` and ``prob_sum``, as one autograd node run on one intra-op
        thread (few small ops, no thread barriers; tests/test_moe_router.py checks values and
        gradients against :meth:`route`)."""
        allowed = None
        if self.expert_group is not None:
            if modality_ids is None:
                raise ValueError("isolated routing needs modality_ids (TEXT=0, IMAGE=1, VIDEO=2)")
            allowed = self.allowed(modality_ids)
        masked, probs, weights, experts, lse, prob_sum = _Routing.apply(logits, allowed, float(temperature), top_k)
        return RouterDecision(logits, masked, probs, weights, experts, lse, prob_sum)

    def route(self, logits: torch.Tensor, top_k: int, modality_ids: torch.Tensor | None = None,
              temperature: float = 1.0) -> RouterDecision:
        """Choose ``top_k`` experts per token from (N, E) float32 logits (plain autograd ops)."""
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
