"""Top-k router: float32 linear -> (masked) softmax -> top-k -> renormalised weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modality import is_visual
from .kernels.pool import single_threaded


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
    def forward(ctx, logits, allowed, temperature, top_k, score_bias=None, norm_min=0.0):  # type: ignore[override]
        with single_threaded():
            masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
            scaled = masked if temperature == 1.0 else masked / temperature
            probs = scaled.softmax(dim=-1)
            ernie = score_bias is not None or norm_min > 0
            if ernie:
                experts, weights, chosen_sum = select_biased(probs, allowed, score_bias, top_k, norm_min)
            else:
                top_logits, experts = scaled.topk(top_k, dim=-1)
                weights = top_logits.softmax(dim=-1)
                chosen_sum = None
            lse = torch.logsumexp(masked, dim=-1)
            prob_sum = probs.sum(0)
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(probs, weights, experts, masked, lse, allowed, chosen_sum)
        ctx.temperature, ctx.norm_min = temperature, norm_min
        return masked, probs, weights, experts, lse, prob_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_masked, d_probs, d_weights, _d_experts, d_lse, d_prob_sum):  # type: ignore[override]
        probs, weights, experts, masked, lse, allowed, chosen_sum = ctx.saved_tensors
        temperature = ctx.temperature
        with single_threaded():
            dp = d_probs + d_prob_sum  # prob_sum = probs.sum(0)
            if chosen_sum is not None:  # weights = probs[chosen] / max(sum, norm_min)
                denom = chosen_sum.clamp(min=ctx.norm_min)
                d_chosen = d_weights - (d_weights * weights).sum(-1, keepdim=True) * (chosen_sum >= ctx.norm_min)
                dp = dp.scatter_add(1, experts, d_chosen / denom)
            ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))  # softmax backward
            if chosen_sum is None:
                d_top = weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True))
                ds.scatter_add_(1, experts, d_top)  # top-k: gather backward
            if temperature != 1.0:
                ds.div_(temperature)
            soft = probs if temperature == 1.0 else torch.exp(masked - lse[:, None])  # softmax(masked)
            ds.add_(soft * d_lse[:, None]).add_(d_masked)
            if allowed is not None:
                ds.masked_fill_(~allowed, 0.0)
        return ds, None, None, None, None, None


def select_biased(probs: torch.Tensor, allowed: torch.Tensor | None, score_bias: torch.Tensor | None,
                  top_k: int, norm_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ERNIE 4.5 selection: top-k of ``probs + score_bias`` (allowed experts only), weights the chosen
    ``probs`` over ``max(their sum, norm_min)``. -> experts (N, k), weights (N, k), sums (N, 1)."""
    scores = probs if score_bias is None else probs + score_bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    experts = scores.topk(top_k, dim=-1).indices
    chosen = probs.gather(1, experts)
    chosen_sum = chosen.sum(-1, keepdim=True)
    return experts, chosen / chosen_sum.clamp(min=norm_min), chosen_sum


class Router(nn.Module):
    """Linear router without bias, weight (E, D), always computed in float32.

    ``expert_group`` (E,) int: the routing group of each expert (0 = text, 1 = visual)
    when routing is isolated, else None (every token may go anywhere).
    ``score_bias`` (E,) float32 or None: selection-only bias (aux-loss-free balancing, see
    :mod:`ernie_vl.moe.balance`); ``load_count`` (E,) the assignments routed since the last update.
    """

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0,
                 num_text_experts: int | None = None, score_bias: bool = False, norm_min: float = 0.0,
                 bias_gamma: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.jitter = jitter
        self.norm_min, self.bias_gamma = float(norm_min), float(bias_gamma)
        if score_bias:  # selection-only offsets (saved), and the load seen since the last update
            self.register_buffer("score_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("load_count", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        else:
            self.score_bias: torch.Tensor | None = None
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        if num_text_experts is None:
            self.expert_group: torch.Tensor | None = None
        else:
            group = (torch.arange(num_experts) >= num_text_experts).long()
            self.register_buffer("expert_group", group, persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, E) float32 logits (autocast off); jitter noise on the input in training."""
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):  # float32 under bf16 autocast too (as ERNIE 4.5)
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
        bias = self.checked_score_bias()
        masked, probs, weights, experts, lse, prob_sum = _Routing.apply(logits, allowed, float(temperature), top_k,
                                                                         bias, self.norm_min)
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
        bias = self.checked_score_bias()
        if bias is not None or self.norm_min > 0:
            allowed = None if self.expert_group is None else self.allowed(modality_ids)
            experts, weights, _ = select_biased(probs, allowed, bias, top_k, self.norm_min)
            return RouterDecision(logits, masked, probs, weights, experts)
        top_logits, experts = scaled.topk(top_k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        return RouterDecision(logits, masked, probs, weights, experts)

    def checked_score_bias(self) -> torch.Tensor | None:
        """The (E,) float32 score bias, or None; a bias of another shape raises ValueError."""
        bias = self.score_bias
        if bias is not None and tuple(bias.shape) != (self.num_experts,):
            raise ValueError(f"score_bias has shape {tuple(bias.shape)}, but the router has "
                             f"{self.num_experts} experts: expected ({self.num_experts},)")
        return bias

    @torch.no_grad()
    def set_score_bias(self, bias: torch.Tensor) -> None:
        """Copy an (E,) or (1, E) bias (e.g. ERNIE's ``e_score_correction_bias``) into ``score_bias``."""
        if self.score_bias is None:
            raise ValueError("this router has no score bias; build the layer with score_bias=True")
        if bias.numel() != self.num_experts or bias.dim() > 2 or (bias.dim() == 2 and bias.shape[0] != 1):
            raise ValueError(f"score bias of shape {tuple(bias.shape)} does not match the router's "
                             f"{self.num_experts} experts: expected ({self.num_experts},) or (1, {self.num_experts})")
        self.score_bias.copy_(bias.reshape(-1).float())

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        """Add (E,) assignments per expert to ``load_count`` (training forwards, for the bias update)."""
        if self.score_bias is not None:
            self.load_count += counts.to(self.load_count.device, torch.long)
