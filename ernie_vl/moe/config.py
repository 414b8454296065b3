"""Typed configuration of one MoE feed-forward layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..checks import check_choice
from .activation import ACTIVATIONS

EXPERT_TYPES = ("mlp", "swiglu")
DISPATCH_MODES = ("dropless", "capacity")
ROUTING_MODES = ("shared", "isolated", "groups")
GROUP_FAMILIES = {"text": (0,), "vision": (1, 2), "image": (1,), "video": (2,)}  # name -> modality ids


@dataclass
class MoEConfig:
    """Options of :class:`ernie_vl.moe.MoEFeedForward` (everything but ``d_model``).

    hidden: expert hidden width (per expert).
    num_experts: routed experts E.
    top_k: experts per token (Mixtral convention: the k weights are renormalised to sum to 1).
    expert_type: ``"mlp"`` (fc -> act -> proj, with biases; CLIP-style) or ``"swiglu"``
        (act(gate) * up -> down, no biases; Mixtral-style).
    activation: ``gelu`` | ``quick_gelu`` | ``gelu_tanh`` | ``silu``; None = ``gelu`` for ``mlp``
        experts, ``silu`` for ``swiglu`` experts (the gate's activation).
    bias: biases on the ``mlp`` experts' two projections.
    dispatch: ``"dropless"`` (sort-based, every token kept) or ``"capacity"``.
    capacity_factor / eval_capacity_factor: per-expert capacity
        ``ceil(factor * tokens * top_k / E)`` in training / in eval (capacity mode only).
    routing: ``"shared"`` (any token to any expert), ``"isolated"`` (one router masked so that
        text tokens choose among the first ``num_text_experts`` experts, visual tokens among the
        rest) or ``"groups"`` (ERNIE 4.5 VL: one expert group per modality family, each with its
        own router, expert count and hidden width; see :mod:`ernie_vl.moe.groups`).
    num_text_experts: size of the text group in isolated routing (default E // 2).
    group_layout: groups mode: the modality family of each group, ``"text"``, ``"vision"``
        (image and video), ``"image"`` or ``"video"``; a modality in no group fails at run time.
    group_experts / group_hidden: groups mode: experts and hidden width per group (default
        ``num_experts`` / ``hidden`` for every group). ``num_experts`` of the layer is their sum.
    score_bias: keep a per-expert score-correction bias (float32 buffer, ERNIE 4.5 / DeepSeek-V3
        aux-loss-free balancing): experts are chosen by top-k of ``probs + bias``; the combine
        weights are the chosen ``probs`` renormalised, without the bias.
    bias_gamma: step of the bias update ``bias += gamma * sign(mean_load - load)`` made by
        :func:`ernie_vl.moe.balance.update_score_biases` after each optimiser step (0 = frozen
        bias); > 0 turns ``score_bias`` on.
    norm_min: the top-k weights are divided by ``max(sum, norm_min)`` (ERNIE's ``moe_norm_min``);
        0 keeps the plain renormalisation (softmax over the chosen logits).
    num_shared_experts: experts every token uses, added to the routed output.
    router_jitter: multiplicative uniform noise ``[1-j, 1+j]`` on the router input in training.
    load_balance_coef / z_loss_coef / orthogonal_coef: weights of the auxiliary losses.
    """

    hidden: int = 2048
    num_experts: int = 8
    top_k: int = 2
    expert_type: str = "mlp"
    activation: str | None = None
    bias: bool = True
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    routing: str = "shared"
    num_text_experts: int | None = None
    group_layout: tuple[str, ...] = ("text", "vision")
    group_experts: tuple[int, ...] | None = None
    group_hidden: tuple[int, ...] | None = None
    score_bias: bool = False
    bias_gamma: float = 0.0
    norm_min: float = 0.0
    num_shared_experts: int = 0
    router_jitter: float = 0.0
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    orthogonal_coef: float = 0.0

    def __post_init__(self) -> None:
        check_choice("expert_type", self.expert_type, EXPERT_TYPES)
        if self.activation is None:
            self.activation = "silu" if self.expert_type == "swiglu" else "gelu"
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("dispatch", self.dispatch, DISPATCH_MODES)
        check_choice("routing", self.routing, ROUTING_MODES)
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.routing == "isolated":
            if self.num_experts < 2:
                raise ValueError(f"isolated routing needs num_experts >= 2, got {self.num_experts}")
            if self.num_text_experts is None:
                self.num_text_experts = self.num_experts // 2
            if not 1 <= self.num_text_experts < self.num_experts:
                raise ValueError(
                    f"num_text_experts must be in [1, {self.num_experts - 1}], got {self.num_text_experts}"
                )
        if self.bias_gamma < 0 or self.norm_min < 0:
            raise ValueError(f"bias_gamma and norm_min must be >= 0, got {self.bias_gamma}, {self.norm_min}")
        if self.bias_gamma > 0:
            self.score_bias = True
        if self.routing == "groups":
            self._check_groups()
        self.check_top_k(self.top_k)

    def _check_groups(self) -> None:
        self.group_layout = tuple(self.group_layout)
        n = len(self.group_layout)
        if n == 0:
            raise ValueError("group_layout is empty; give at least one of " + ", ".join(GROUP_FAMILIES))
        seen: dict[int, str] = {}
        for name in self.group_layout:
            check_choice("group family", name, tuple(GROUP_FAMILIES))
            for m in GROUP_FAMILIES[name]:
                if m in seen:
                    raise ValueError(f"group_layout {list(self.group_layout)}: modality {m} is in both "
                                     f"{seen[m]!r} and {name!r}")
                seen[m] = name
        for field_name, default in (("group_experts", self.num_experts), ("group_hidden", self.hidden)):
            value = getattr(self, field_name)
            value = (default,) * n if value is None else tuple(int(v) for v in value)
            if len(value) != n or min(value) < 1:
                raise ValueError(f"{field_name} must give one value >= 1 per group of group_layout "
                                 f"{list(self.group_layout)} ({n}), got {list(value)}")
            setattr(self, field_name, value)

    @property
    def total_experts(self) -> int:
        """Routed experts of the layer (the sum over groups in groups mode)."""
        return sum(self.group_experts) if self.routing == "groups" else self.num_experts  # type: ignore[arg-type]

    def group_sizes(self) -> tuple[int, ...]:
        """Experts a token may choose from: (E,) shared, (text, visual) isolated, one per group."""
        if self.routing == "isolated":
            assert self.num_text_experts is not None
            return (self.num_text_experts, self.num_experts - self.num_text_experts)
        if self.routing == "groups":
            assert self.group_experts is not None
            return tuple(self.group_experts)
        return (self.num_experts,)

    def check_top_k(self, top_k: int) -> int:
        """Validate ``top_k`` against the smallest routing group; returns it."""
        smallest = min(self.group_sizes())
        if not 1 <= top_k <= smallest:
            raise ValueError(
                f"top_k must be in [1, {smallest}] for {self.routing} routing over "
                f"{self.num_experts} experts, got {top_k}"
            )
        return top_k

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
