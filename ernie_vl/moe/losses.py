"""Router auxiliary losses: Switch load balance, ST-MoE z-loss, ERNIE 4.5 orthogonal loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, token_group: torch.Tensor | None = None,
                      expert_group: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e`` (1.0 when uniform).

    probs: (N, E) router probabilities of the real (non-padding) tokens.
    experts: (N, k) chosen experts; f_e is the fraction of the N*k assignments to e,
        P_e the mean router probability of e. (transformers' Mixtral loss is k times this.)
    token_group / expert_group: with isolated routing, (N,) and (E,) group ids; the loss is
        computed per group over that group's tokens and experts (E -> group size) and
        averaged weighted by the group's share of tokens (tokens only choose experts of
        their own group).
    Returns a float32 scalar (0 when there are no tokens).
    """
    num_experts = probs.shape[1]
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    group_tokens = None
    if token_group is not None and expert_group is not None:
        group_tokens = torch.bincount(token_group, minlength=int(expert_group.max()) + 1)
    return load_balance_from_counts(probs.sum(0), counts, probs.shape[0], experts.shape[1],
                                    group_tokens, expert_group)


def load_balance_from_counts(prob_sum: torch.Tensor, counts: torch.Tensor, num_tokens: int, top_k: int,
                             group_tokens: torch.Tensor | None = None,
                             expert_group: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`load_balance_loss` from (E,) probability sums and (E,) assignment counts.

    group_tokens: (G,) tokens per routing group and expert_group (E,) for isolated routing.
    """
    if num_tokens == 0:
        return prob_sum.new_zeros(())
    counts = counts.to(prob_sum.dtype)
    if group_tokens is None or expert_group is None:
        return counts.size(0) * (counts * prob_sum).sum() / (num_tokens * top_k * num_tokens)
    n_g = group_tokens.to(prob_sum.dtype)[expert_group]  # tokens of each expert's group
    e_g = torch.bincount(expert_group).to(prob_sum.dtype)[expert_group]  # size of each expert's group
    per_expert = e_g * counts * prob_sum / (top_k * n_g.square().clamp(min=1.0))
    return (per_expert * n_g).sum() / num_tokens


def router_z_loss(masked_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_n logsumexp(logits_n)^2`` over real tokens (``-inf`` entries ignored)."""
    if masked_logits.shape[0] == 0:
        return masked_logits.new_zeros(())
    return torch.logsumexp(masked_logits, dim=-1).square().mean()


def router_z_loss_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """:func:`router_z_loss` from the (N,) per-token ``logsumexp`` of the masked logits."""
    if lse.shape[0] == 0:
        return lse.new_zeros(())
    return lse.square().mean()


def router_orthogonal_loss(router_weight: torch.Tensor) -> torch.Tensor:
    """ERNIE 4.5 router orthogonal loss: ``mean((W_hat W_hat^T - I)^2)`` over the E x E entries.

    W_hat is the (E, D) router weight with each expert's row L2-normalised, so the loss is
    0 exactly when the experts' router directions are orthogonal.
    """
    w = F.normalize(router_weight.float(), dim=-1)
    gram = w @ w.t()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).square().mean()
