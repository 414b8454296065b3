"""Exact converters from transformers' ERNIE 4.5 MoE blocks to :class:`MoEFeedForward`.

- ``Ernie4_5_MoeSparseMoeBlock`` (``ernie4_5_moe``, text): fp32 router with
  ``e_score_correction_bias`` and ``moe_norm_min``, stacked SwiGLU experts, optional shared
  experts -> a shared-routing layer with ``score_bias=True``.
- ``Ernie4_5_VLMoeMoeBlock`` (``ernie4_5_vl_moe``): a text and a vision sparse block, each with
  its own router and expert width, plus shared experts -> a ``routing="groups"`` layer with
  ``group_layout=("text", "vision")``.

Both read the weights only (no transformers import), so any block with the same attributes works.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from encoders.activations import act_name, canonical_act

from .upcycle import stacked_swiglu_weights

_ACTIVATION_TYPES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
                     "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                     "QuickGELUActivation": "quick_gelu"}


def _activation(block: nn.Module, experts: nn.Module) -> str:
    shared = getattr(block, "shared_experts", None)
    config = getattr(shared, "config", None)
    if config is not None and getattr(config, "hidden_act", None) is not None:
        try:
            return canonical_act(config.hidden_act)
        except (TypeError, ValueError) as err:
            raise ValueError(f"unsupported ERNIE 4.5 hidden_act: {err}") from None
    act = getattr(experts, "act_fn", None)
    kind = type(act).__name__
    if isinstance(act, nn.Module) and kind not in _ACTIVATION_TYPES:
        return act_name(act)  # torch's own modules; ValueError naming the supported ones otherwise
    if kind not in _ACTIVATION_TYPES:
        raise ValueError(f"unsupported ERNIE 4.5 expert activation {kind}; valid: {sorted(_ACTIVATION_TYPES)}")
    return _ACTIVATION_TYPES[kind]


def _sparse_parts(sparse: nn.Module, what: str) -> dict[str, Any]:
    """Router weight (E, D), score bias, norm_min, top-k and stacked experts of one sparse block."""
    gate = getattr(sparse, "gate", None)
    if gate is None or not hasattr(gate, "weight") or not hasattr(sparse, "experts"):
        raise TypeError(f"{what}: expected an ERNIE 4.5 sparse MoE block with .gate and .experts, "
                        f"got {type(sparse).__name__}")
    statics = getattr(gate, "moe_statics", None)
    bias = getattr(statics, "e_score_correction_bias", None)
    gate_up, down = stacked_swiglu_weights(sparse.experts)
    num_experts, d_model = gate.weight.shape
    if gate_up.shape[0] != num_experts:
        raise ValueError(f"{what}: the router has {num_experts} experts but the experts tensor {gate_up.shape[0]}")
    return {"router": gate.weight, "bias": bias, "norm_min": float(getattr(gate, "norm_min", 0.0) or 0.0),
            "top_k": int(getattr(gate, "top_k", getattr(sparse, "top_k", 2))), "gate_up": gate_up, "down": down,
            "num_experts": num_experts, "d_model": d_model, "hidden": down.shape[2]}


def _shared_count(block: nn.Module, hidden: int) -> int:
    shared = getattr(block, "shared_experts", None)
    if shared is None:
        return 0
    if any(getattr(shared, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError("ERNIE 4.5 shared experts with biases (use_bias=True) are not supported: "
                         "our SwiGLU experts have no biases")
    width = shared.down_proj.weight.shape[1]
    if width % hidden:
        raise ValueError(f"shared expert width {width} is not a multiple of the expert width {hidden}")
    return width // hidden


@torch.no_grad()
def _fill_group(sub: nn.Module, parts: dict[str, Any]) -> None:
    sub.router.weight.copy_(parts["router"])
    if parts["bias"] is not None:
        sub.router.set_score_bias(parts["bias"])
    sub.experts.w_gate_up.copy_(parts["gate_up"])
    sub.experts.w_down.copy_(parts["down"])


@torch.no_grad()
def _fill_shared(layer: nn.Module, block: nn.Module) -> None:
    shared = getattr(block, "shared_experts", None)
    if shared is None:
        return
    layer.shared.gate_up.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight], 0))
    layer.shared.down.weight.copy_(shared.down_proj.weight)


def layer_from_ernie45(cls: type, block: nn.Module):
    """Implementation of ``MoEFeedForward.from_ernie45``."""
    parts = _sparse_parts(block, "from_ernie45")
    layer = cls(parts["d_model"], parts["hidden"], parts["num_experts"], parts["top_k"], expert_type="swiglu",
                activation=_activation(block, block.experts), score_bias=True, norm_min=parts["norm_min"],
                num_shared_experts=_shared_count(block, parts["hidden"]))
    layer.to(device=parts["gate_up"].device, dtype=parts["gate_up"].dtype)
    _fill_group(layer, parts)
    _fill_shared(layer, block)
    return layer


def layer_from_ernie45_vl(cls: type, block: nn.Module):
    """Implementation of ``MoEFeedForward.from_ernie45_vl`` (text group 0, vision group 1)."""
    if not (hasattr(block, "text_moe") and hasattr(block, "vision_moe")):
        raise TypeError(f"from_ernie45_vl: expected an Ernie4_5_VLMoeMoeBlock with .text_moe and .vision_moe, "
                        f"got {type(block).__name__}")
    text = _sparse_parts(block.text_moe, "from_ernie45_vl text_moe")
    vision = _sparse_parts(block.vision_moe, "from_ernie45_vl vision_moe")
    if text["top_k"] != vision["top_k"] or text["d_model"] != vision["d_model"]:
        raise ValueError(f"text and vision groups differ in top_k ({text['top_k']}, {vision['top_k']}) or width "
                         f"({text['d_model']}, {vision['d_model']}); one layer needs them equal")
    layer = cls(text["d_model"], text["hidden"], text["num_experts"], text["top_k"], routing="groups",
                group_layout=("text", "vision"), group_experts=(text["num_experts"], vision["num_experts"]),
                group_hidden=(text["hidden"], vision["hidden"]), expert_type="swiglu",
                activation=_activation(block, block.text_moe.experts), score_bias=True,
                norm_min=max(text["norm_min"], vision["norm_min"]),
                num_shared_experts=_shared_count(block, text["hidden"]))
    layer.to(device=text["gate_up"].device, dtype=text["gate_up"].dtype)
    _fill_group(layer.groups[0], text)
    _fill_group(layer.groups[1], vision)
    _fill_shared(layer, block)
    return layer
