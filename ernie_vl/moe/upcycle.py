"""Build MoE layers from a dense MLP (sparse upcycling) or from a Mixtral sparse MoE block."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from encoders.activations import act_name, canonical_act

from .experts import DenseMLP, DenseSwiGLU

def activation_name(module: nn.Module) -> str:
    """Our activation name for an activation module (nn.GELU, nn.SiLU, open_clip QuickGELU)."""
    try:
        return act_name(module)
    except ValueError as err:
        raise TypeError(str(err)) from None


def read_dense_mlp(dense: Any) -> dict[str, Any]:
    """Normalise a dense MLP into ``{kind, activation, tensors...}`` (see ``MoEFeedForward.upcycle``)."""
    if isinstance(dense, DenseMLP):
        return {"kind": "mlp", "activation": dense.activation, "fc_weight": dense.fc.weight,
                "fc_bias": dense.fc.bias, "proj_weight": dense.proj.weight, "proj_bias": dense.proj.bias}
    if isinstance(dense, DenseSwiGLU):
        return {"kind": "swiglu", "activation": dense.activation,
                "gate_up_weight": dense.gate_up.weight, "down_weight": dense.down.weight}
    if isinstance(dense, dict) and dense.get("kind") in ("mlp", "swiglu"):
        return dense
    if isinstance(dense, dict):
        required = {"fc_weight", "proj_weight", "activation"}
        if not required <= dense.keys():
            raise ValueError(f"dense MLP dict needs keys {sorted(required)} (+ fc_bias, proj_bias), "
                             f"got {sorted(dense)}")
        return {"kind": "mlp", "fc_bias": None, "proj_bias": None, **dense}
    if isinstance(dense, nn.Module):
        children = list(dense.children())
        if (len(children) == 3 and isinstance(children[0], nn.Linear) and isinstance(children[2], nn.Linear)):
            fc, act, proj = children
            return {"kind": "mlp", "activation": activation_name(act), "fc_weight": fc.weight,
                    "fc_bias": fc.bias, "proj_weight": proj.weight, "proj_bias": proj.bias}
    raise TypeError(f"cannot upcycle {type(dense).__name__}: expected DenseMLP, DenseSwiGLU, a "
                    "(Linear, activation, Linear) module, or a dict of fc/proj weights")


@torch.no_grad()
def _fill(param: torch.Tensor, dense_weight: torch.Tensor, noise_std: float) -> None:
    param.copy_(dense_weight.detach().to(param.dtype).unsqueeze(0).expand_as(param))
    if noise_std > 0:
        param.mul_(1.0 + noise_std * torch.randn_like(param))


def _check_shape(name: str, have: torch.Size, want: torch.Size) -> None:
    if tuple(have) != tuple(want):
        raise ValueError(f"dense MLP {name} has shape {tuple(have)}, the MoE experts need {tuple(want)}")


@torch.no_grad()
def fill_from_dense(layer: nn.Module, dense: Any, noise_std: float = 0.0) -> None:
    """Copy a dense MLP into every routed expert of an existing layer (shapes must match).

    Shared experts, if any, get a zero output projection so the layer output still equals
    the dense output at initialisation.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    spec = read_dense_mlp(dense)
    if getattr(layer, "groups", None) is not None:  # modality groups: every group starts from the dense MLP
        for sub in layer.groups:
            fill_from_dense(sub, spec, noise_std)
        _zero_shared_output(layer)
        return
    ex = layer.experts
    kind = "swiglu" if hasattr(ex, "w_gate_up") else "mlp"
    if spec["kind"] != kind:
        raise TypeError(f"cannot fill {kind} experts from a {spec['kind']} dense MLP")
    if spec["activation"] != ex.activation:
        raise ValueError(f"dense activation {spec['activation']!r} != expert activation {ex.activation!r}")
    if kind == "swiglu":
        _check_shape("gate_up weight", spec["gate_up_weight"].shape, ex.w_gate_up.shape[1:])
        _check_shape("down weight", spec["down_weight"].shape, ex.w_down.shape[1:])
        _fill(ex.w_gate_up, spec["gate_up_weight"], noise_std)
        _fill(ex.w_down, spec["down_weight"], noise_std)
    else:
        _check_shape("fc weight", spec["fc_weight"].shape, ex.w1.shape[1:])
        _check_shape("proj weight", spec["proj_weight"].shape, ex.w2.shape[1:])
        _fill(ex.w1, spec["fc_weight"], noise_std)
        _fill(ex.w2, spec["proj_weight"], noise_std)
        has_bias = spec["fc_bias"] is not None or spec["proj_bias"] is not None
        if ex.b1 is None and has_bias:
            raise ValueError("the dense MLP has biases but the experts were built with bias=False")
        if ex.b1 is not None:
            _fill(ex.b1, ex.b1.new_zeros(ex.hidden) if spec["fc_bias"] is None else spec["fc_bias"], 0.0)
            _fill(ex.b2, ex.b2.new_zeros(ex.d_model) if spec["proj_bias"] is None else spec["proj_bias"], 0.0)
    _zero_shared_output(layer)


def _zero_shared_output(layer: nn.Module) -> None:
    """Shared experts output 0 at first, so an upcycled layer equals the dense MLP."""
    if layer.shared is not None:
        out = layer.shared.down if hasattr(layer.shared, "down") else layer.shared.proj
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()


def upcycle_layer(cls: type, dense: Any, num_experts: int, top_k: int, noise_std: float,
                  options: dict[str, Any]):
    """Implementation of ``MoEFeedForward.upcycle``: build a matching layer, then fill it."""
    spec = read_dense_mlp(dense)
    for key in ("expert_type", "activation", "bias", "hidden"):
        if key in options:
            raise ValueError(f"upcycle takes {key!r} from the dense MLP; do not pass it")
    if spec["kind"] == "swiglu":
        d_model, hidden = spec["down_weight"].shape
        layer = cls(d_model, hidden, num_experts, top_k, expert_type="swiglu",
                    activation=spec["activation"], **options)
    else:
        hidden, d_model = spec["fc_weight"].shape
        bias = spec["fc_bias"] is not None or spec["proj_bias"] is not None
        layer = cls(d_model, hidden, num_experts, top_k, expert_type="mlp",
                    activation=spec["activation"], bias=bias, **options)
    ref = spec.get("fc_weight", spec.get("gate_up_weight"))
    layer.to(device=ref.device, dtype=ref.dtype)
    fill_from_dense(layer, spec, noise_std)
    return layer


def _mixtral_activation(block: nn.Module) -> str:
    config = getattr(block.experts, "config", None)
    name = getattr(config, "hidden_act", "silu")
    try:
        return canonical_act(name)
    except (TypeError, ValueError) as err:
        raise ValueError(f"unsupported Mixtral hidden_act: {err}") from None


def stacked_swiglu_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' expert weights as (E, 2I, D) ``[gate; up]`` and (E, D, I) ``down``."""
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: stacked (E, 2I, D) / (E, D, I)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if getattr(experts, "is_transposed", False):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return gate_up, down
    # older: ModuleList of w1 (gate), w3 (up), w2 (down) Linears
    gate_up = torch.stack([torch.cat([e.w1.weight, e.w3.weight], 0) for e in experts])
    return gate_up, torch.stack([e.w2.weight for e in experts])


@torch.no_grad()
def layer_from_mixtral(cls: type, block: nn.Module):
    """Implementation of ``MoEFeedForward.from_mixtral`` (stacked and per-expert Mixtral layouts)."""
    if not (hasattr(block, "gate") and hasattr(block, "experts")):
        raise TypeError(f"expected a transformers MixtralSparseMoeBlock, got {type(block).__name__}")
    router_w = block.gate.weight
    num_experts, d_model = router_w.shape
    top_k = int(getattr(block, "top_k", getattr(block.gate, "top_k", 2)))
    gate_up, down = stacked_swiglu_weights(block.experts)
    hidden = down.shape[2]
    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
    layer = cls(d_model, hidden, num_experts, top_k, expert_type="swiglu",
                activation=_mixtral_activation(block), router_jitter=jitter)
    layer.to(device=router_w.device, dtype=router_w.dtype)
    layer.router.weight.copy_(router_w)
    layer.experts.w_gate_up.copy_(gate_up)
    layer.experts.w_down.copy_(down)
    return layer
