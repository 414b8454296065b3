"""The MoE feed-forward layer: router -> sort-based dispatch -> stacked experts -> combine.

The experts run on the layer's ``backend`` (:mod:`ernie_vl.moe.kernels.choose`). The spec is
:func:`reference_dispatch` below: sort the assignments by expert, one product per expert, combine;
every fast kernel under ``ernie_vl/moe/kernels/`` is tested against it, output and every gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modality import NUM_MODALITIES, TEXT, is_visual
from .config import MoEConfig
from .dispatch import DispatchPlan, expert_capacity, plan_dispatch
from .experts import DenseMLP, DenseSwiGLU, MLPExperts, SwiGLUExperts
from .kernels import check_backend, choose_backend, run_experts, single_threaded
from .losses import load_balance_from_counts, router_orthogonal_loss, router_z_loss_from_lse
from .router import Router
from .stats import RoutingStats, compute_routing_stats


def check_modality_ids(modality_ids: torch.Tensor) -> None:
    """Raise unless ``modality_ids`` is an integer tensor of values in [0, NUM_MODALITIES)."""
    if modality_ids.dtype.is_floating_point or modality_ids.dtype == torch.bool:
        raise TypeError(f"modality_ids must be an integer tensor, got {modality_ids.dtype}")
    if modality_ids.numel() and (int(modality_ids.min()) < 0 or int(modality_ids.max()) >= NUM_MODALITIES):
        raise ValueError(f"modality_ids must be in [0, {NUM_MODALITIES}) (TEXT=0, IMAGE=1, VIDEO=2), "
                         f"got values in [{int(modality_ids.min())}, {int(modality_ids.max())}]")


def reference_dispatch(experts: nn.Module, tokens: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The spec of every expert kernel, in plain autograd ops.

    tokens (N, D), weights (N, k) router weights of each token's k choices, ``plan`` from
    :func:`~ernie_vl.moe.dispatch.plan_dispatch` -> (N, D): each token's weighted sum of its
    kept experts' outputs (a dropped assignment adds nothing), computed in the experts' dtype.
    """
    x = tokens.to(experts.params()[0].dtype)
    rows = x.index_select(0, plan.token_index)  # (M, D): the kept assignments, sorted by expert
    outputs = [experts.expert(chunk, e) for e, chunk in enumerate(rows.split(plan.counts))]  # one product each
    outputs.append(x.new_zeros(1, x.shape[1]))  # row M: what a dropped assignment gets
    per_token = torch.cat(outputs).index_select(0, plan.inverse).view(*weights.shape, -1)  # (N, k, D)
    return (weights.to(x.dtype).unsqueeze(-1) * per_token).sum(1).to(tokens.dtype)


@dataclass
class MoEOutput:
    """Result of one MoE layer.

    output: same shape as the input, (B, L, D) or (N, D); padding rows are 0.
    router_logits: (N, E) float32 raw router logits of every token (padding included).
    aux_loss: () weighted sum ``lb_coef * lb + z_coef * z + orth_coef * orth``.
    load_balance_loss / z_loss / orthogonal_loss: () unweighted, padding excluded.
    stats: routing statistics of the real tokens.
    groups: ``routing="groups"`` only: ``"<index>:<family>"`` -> that group's own MoEOutput (its
        losses and statistics over its experts), for the groups present in the batch.
    """

    output: torch.Tensor
    router_logits: torch.Tensor
    aux_loss: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    orthogonal_loss: torch.Tensor
    stats: RoutingStats
    groups: dict[str, "MoEOutput"] | None = None


@dataclass
class RoutedTokens:
    """The routing of one call: ``flat`` (N, D) all tokens, ``logits`` (N, E) router logits,
    ``tokens`` / ``modality_ids`` the real (unpadded) ones, ``real_index`` their rows in ``flat``
    (None when nothing is padded), the router's ``decision`` and the dispatch ``plan``."""

    flat: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor
    modality_ids: torch.Tensor
    real_index: torch.Tensor | None
    decision: Any
    plan: Any

    def scatter_back(self, y: torch.Tensor) -> torch.Tensor:
        """(N_real, D) outputs of the real tokens -> (N, D), zeros at padding."""
        if self.real_index is None:
            return y
        return self.flat.new_zeros(self.flat.shape).index_copy(0, self.real_index, y)


class MoEFeedForward(nn.Module):
    """Top-k mixture-of-experts feed-forward layer.

    Args: ``d_model``, then the :class:`MoEConfig` fields (``hidden``, ``num_experts``,
    ``top_k``, ``expert_type``, ``activation``, ``dispatch``, ``routing``, ...).

    ``forward(x, modality_ids=None, mask=None)``:
        x: (B, L, D) or (N, D).
        modality_ids: same leading shape, int (TEXT=0, IMAGE=1, VIDEO=2); default all text
            (required with isolated routing).
        mask: same leading shape, bool, True = real token; padding is not routed, gets output 0
            and is excluded from the losses and statistics.
        returns :class:`MoEOutput`.

    ``self.top_k`` is the k in use (an :class:`ExpertCurriculum` may change it);
    ``self.temperature`` divides the router logits before the softmax (default 1);
    ``self.backend`` (constructor ``backend=``, default ``"auto"``) is the expert kernel:
    ``"auto"`` | ``"reference"`` | ``"loop"`` | ``"threads"`` | ``"openblas"``
    (:mod:`ernie_vl.moe.kernels.choose`); a run-time choice, not part of the config.
    """

    def __init__(self, d_model: int, hidden: int = 2048, num_experts: int = 8, top_k: int = 2,
                 backend: str = "auto", **options: Any) -> None:
        super().__init__()
        self.groups: nn.ModuleList | None = None
        self.expert_shard: Any = None  # set by expert_parallel.shard_experts_: experts spread over ranks
        self.backend = backend
        try:
            cfg = MoEConfig(hidden=hidden, num_experts=num_experts, top_k=top_k, **options)
        except TypeError as err:
            raise TypeError(f"MoEFeedForward: {err}; valid options: {sorted(MoEConfig.__dataclass_fields__)}") from err
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.d_model = d_model
        self.config = cfg
        self.top_k = cfg.top_k
        self.temperature = 1.0
        act = cfg.activation
        assert act is not None
        if cfg.routing == "groups":  # per-family sub-layers own the routers and experts
            from .groups import build_groups

            self.router, self.experts, self.groups = None, None, build_groups(d_model, cfg)
            self.backend = backend  # the sub-layers run on it too
        else:
            text_experts = cfg.num_text_experts if cfg.routing == "isolated" else None
            self.router = Router(d_model, cfg.num_experts, cfg.router_jitter, text_experts, cfg.score_bias,
                                 cfg.norm_min, cfg.bias_gamma)
            if cfg.expert_type == "swiglu":
                self.experts = SwiGLUExperts(cfg.num_experts, d_model, cfg.hidden, act)
            else:
                self.experts = MLPExperts(cfg.num_experts, d_model, cfg.hidden, act, cfg.bias)
        self.shared: nn.Module | None = None
        if cfg.num_shared_experts > 0:
            shared_hidden = cfg.num_shared_experts * cfg.hidden
            self.shared = (DenseSwiGLU(d_model, shared_hidden, act) if cfg.expert_type == "swiglu"
                           else DenseMLP(d_model, shared_hidden, act, cfg.bias))

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend(name)
        for sub in self.groups or ():
            sub.backend = name

    def expert_backend(self, tokens: torch.Tensor, counts: list[int]) -> str:
        """The backend this layer's experts run on for ``tokens`` with per-expert row ``counts``."""
        return choose_backend(self.backend, tokens, counts).name

    @classmethod
    def from_config(cls, d_model: int, cfg: MoEConfig) -> "MoEFeedForward":
        return cls(d_model, **cfg.to_dict())

    @property
    def num_experts(self) -> int:
        """Routed experts of the layer (summed over the groups in groups mode)."""
        return self.config.total_experts

    def shared_params(self) -> int:
        return 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())

    def expert_params(self) -> int:
        """Parameters of all routed and shared experts."""
        if self.groups is not None:
            return sum(g.expert_params() for g in self.groups) + self.shared_params()
        return self.num_experts * self.experts.params_per_expert() + self.shared_params()

    def active_expert_params(self) -> int:
        """Expert parameters one token uses at ``top_k`` (the widest group's in groups mode)."""
        if self.groups is not None:
            return max(g.active_expert_params() for g in self.groups) + self.shared_params()
        return self.top_k * self.experts.params_per_expert() + self.shared_params()

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for ``num_tokens`` real tokens (None when dropless)."""
        cfg = self.config
        if cfg.dispatch == "dropless":
            return None
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return expert_capacity(num_tokens, self.top_k, cfg.num_experts, factor)

    def _flatten_inputs(self, x: torch.Tensor, modality_ids: torch.Tensor | None,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, {self.d_model}) or (N, {self.d_model}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if modality_ids is None:
            if self.config.routing == "isolated":
                raise ValueError("isolated routing needs modality_ids (TEXT=0, IMAGE=1, VIDEO=2)")
            modality_ids = torch.full(lead, TEXT, dtype=torch.long, device=x.device)
        if modality_ids.shape != lead:
            raise ValueError(f"modality_ids must have shape {tuple(lead)}, got {tuple(modality_ids.shape)}")
        check_modality_ids(modality_ids)
        if mask is not None:
            if mask.shape != lead:
                raise ValueError(f"mask must have shape {tuple(lead)} (True = real token), got {tuple(mask.shape)}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be bool (True = real token), got {mask.dtype}")
            mask = mask.reshape(-1)
        return x.reshape(-1, self.d_model), modality_ids.reshape(-1), mask

    def route_tokens(self, x: torch.Tensor, modality_ids: torch.Tensor | None,
                     mask: torch.Tensor | None) -> "RoutedTokens":
        """Flatten (B, L, D) to (N, D), route the real (unpadded) tokens and plan their dispatch.

        All small (tokens, experts) ops, run on one intra-op thread (see ``single_threaded``)."""
        with single_threaded():
            return self._route_tokens(x, modality_ids, mask)

    def _route_tokens(self, x: torch.Tensor, modality_ids: torch.Tensor | None,
                      mask: torch.Tensor | None) -> "RoutedTokens":
        flat, ids, mask = self._flatten_inputs(x, modality_ids, mask)
        logits = self.router.logits(flat)
        real_index = None
        if mask is not None and not bool(mask.all()):
            real_index = mask.nonzero().squeeze(1)
            tokens, ids_r, logits_r = flat[real_index], ids[real_index], logits[real_index]
        else:
            tokens, ids_r, logits_r = flat, ids, logits
        decision = self.router.route_fused(logits_r, self.top_k, ids_r, self.temperature)
        plan = plan_dispatch(decision.experts, self.config.num_experts, self.capacity(tokens.shape[0]))
        if self.training:
            self.router.record_load(plan.routed_counts)
        return RoutedTokens(flat, logits, tokens, ids_r, real_index, decision, plan)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.config
        cfg.check_top_k(self.top_k)
        if self.expert_shard is not None:
            from .expert_parallel import ep_forward

            return ep_forward(self, x, modality_ids, mask)
        if self.groups is not None:
            from .groups import grouped_forward

            return grouped_forward(self, x, modality_ids, mask)
        r = self.route_tokens(x, modality_ids, mask)
        tokens, decision, plan = r.tokens, r.decision, r.plan
        experts = self.experts
        backend = self.expert_backend(tokens, plan.counts)
        if backend == "reference":
            y = reference_dispatch(experts, tokens, decision.weights, plan)
        else:
            y = run_experts(backend, tokens, decision.weights, plan.order, plan.token_index, plan.inverse,
                            plan.counts, experts.kind, experts.activation, experts.params())
        y = r.scatter_back(y + self.shared(tokens) if self.shared is not None else y)

        return self._with_routing_terms(r, y.view(x.shape))

    def _with_routing_terms(self, r: "RoutedTokens", output: torch.Tensor) -> MoEOutput:
        """The MoEOutput of routed tokens ``r`` around ``output``: aux losses and routing statistics
        (small ops, on one intra-op thread)."""
        with single_threaded():
            return self._routing_terms(r, output)

    def _routing_terms(self, r: "RoutedTokens", output: torch.Tensor) -> MoEOutput:
        cfg = self.config
        decision, plan, ids_r = r.decision, r.plan, r.modality_ids
        group = self.router.expert_group
        group_tokens = None
        if group is not None:
            group_tokens = torch.bincount(is_visual(ids_r).long(), minlength=2)
        lb = load_balance_from_counts(decision.prob_sum, plan.routed_counts, r.tokens.shape[0], self.top_k,
                                      group_tokens, group)
        z = router_z_loss_from_lse(decision.lse)
        orth = router_orthogonal_loss(self.router.weight)
        aux = cfg.load_balance_coef * lb + cfg.z_loss_coef * z + cfg.orthogonal_coef * orth
        stats = compute_routing_stats(decision.probs, decision.experts, ids_r, plan.routed_counts,
                                      plan.dropped, self.experts.params_per_expert(), self.shared_params())
        return MoEOutput(output, r.logits, aux, lb, z, orth, stats)

    def routing_output(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> MoEOutput:
        """``self(x, modality_ids, mask)`` without running the experts: the router logits, aux losses
        and routing statistics of the full call, with ``output`` a zero (expanded) view of x's shape,
        for a caller that multiplies it by a closed (zero) gate."""
        self.config.check_top_k(self.top_k)
        if self.expert_shard is not None:  # every rank of the group must take part in the exchange
            from .expert_parallel import ep_forward

            return ep_forward(self, x, modality_ids, mask, routing_only=True)
        if self.groups is not None:
            from .groups import grouped_forward

            return grouped_forward(self, x, modality_ids, mask, routing_only=True)
        r = self.route_tokens(x, modality_ids, mask)
        return self._with_routing_terms(r, x.new_zeros(()).expand(x.shape))

    # ---- construction from dense MLPs and from Mixtral ------------------------------------

    @classmethod
    def upcycle(cls, dense_mlp: Any, num_experts: int, top_k: int = 2, noise_std: float = 0.0,
                **options: Any) -> "MoEFeedForward":
        """Sparse upcycling: every expert starts as a copy of ``dense_mlp``.

        ``dense_mlp`` may be (see :func:`ernie_vl.moe.upcycle.read_dense_mlp`):
        the backbone's :class:`DenseMLP` (``fc`` / ``activation`` / ``proj``), a
        ``nn.Sequential``-like module ``(Linear, activation module, Linear)`` such as
        open_clip's ``c_fc`` / ``gelu`` / ``c_proj``, a :class:`DenseSwiGLU`, or a dict
        ``{"fc_weight" (H, D), "fc_bias" (H,) | None, "proj_weight" (D, H),
        "proj_bias" (D,) | None, "activation": "gelu" | "quick_gelu" | ...}``.
        Since the top-k weights sum to 1, the output equals the dense output at init
        (up to float rounding). ``noise_std`` > 0 multiplies each expert's weights by
        ``1 + noise_std * N(0, 1)`` (independently per expert) to break the symmetry.
        """
        from .upcycle import upcycle_layer

        return upcycle_layer(cls, dense_mlp, num_experts, top_k, noise_std, options)

    def fill_from_dense_(self, dense_mlp: Any, noise_std: float = 0.0) -> "MoEFeedForward":
        """Copy a dense MLP (formats as in :meth:`upcycle`) into every expert of this layer, in place.

        Shapes and activation must match; shared experts get a zero output projection so
        the output equals the dense output at initialisation.
        """
        from .upcycle import fill_from_dense

        fill_from_dense(self, dense_mlp, noise_std)
        return self

    @classmethod
    def from_mixtral(cls, block: nn.Module) -> "MoEFeedForward":
        """A layer equal to a transformers ``MixtralSparseMoeBlock`` (SwiGLU experts, no bias).

        Output matches ``block(x)`` and ``router_logits`` match ``block.gate``'s logits
        (eval mode; Mixtral's jitter also scales the experts' input, ours only the router's).
        """
        from .upcycle import layer_from_mixtral

        return layer_from_mixtral(cls, block)

    @classmethod
    def from_ernie45(cls, block: nn.Module) -> "MoEFeedForward":
        """A layer equal to a transformers ``Ernie4_5_MoeSparseMoeBlock``: SwiGLU experts, shared
        experts, the score-correction bias and ``norm_min`` (output matches ``block(x)``)."""
        from .convert_ernie45 import layer_from_ernie45

        return layer_from_ernie45(cls, block)

    @classmethod
    def from_ernie45_vl(cls, block: nn.Module) -> "MoEFeedForward":
        """A groups-mode layer (text, vision) equal to a transformers ``Ernie4_5_VLMoeMoeBlock``:
        ``layer(x, modality_ids)`` matches ``block(x, moe_mm_token_type_ids)``, and so do the router logits."""
        from .convert_ernie45 import layer_from_ernie45_vl

        return layer_from_ernie45_vl(cls, block)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={self.d_model}, num_experts={cfg.num_experts}, top_k={self.top_k}, "
                f"dispatch={cfg.dispatch}, routing={cfg.routing}, shared={cfg.num_shared_experts}")
