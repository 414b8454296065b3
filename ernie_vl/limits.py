"""Model config bounds in one place, checked before anything is allocated.

Every field of an ``ErnieVLConfig`` (and of its encoder, text, projector, backbone, MoE,
head and loss sections) has its type checked against the dataclass annotation and its
value against :data:`FIELD_BOUNDS` (by field name, in every section), plus the
cross-field rules (heads divide widths, ``top_k <= num_experts``, patch grids). Then
:func:`estimate_params` counts the parameters the config would build (on the meta
device: shapes only, no memory), and :func:`check_param_budget` refuses a model over the limit: ``max_params`` when
given, else the ``ERNIE_VL_MAX_PARAMS`` environment variable, else
:data:`DEFAULT_MAX_PARAMS`. A config from ``create_model``, a preset or a checkpoint's
``config.json`` thus fails in milliseconds with the field name, never in the allocator.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Optional

# inclusive (low, high) per field name, wherever the field appears
FIELD_BOUNDS: dict[str, tuple[float, float]] = {
    "width": (1, 16384), "depth": (1, 256), "num_heads": (1, 1024), "embed_dim": (1, 16384),
    "mlp_dim": (1, 131072), "mlp_hidden": (1, 131072), "hidden": (1, 131072), "mlp_ratio": (1e-3, 64),
    "num_experts": (1, 1024), "group_experts": (1, 1024), "group_hidden": (1, 131072), "top_k": (1, 1024), "num_text_experts": (1, 1023), "num_shared_experts": (0, 64),
    "moe_every": (0, 256), "capacity_factor": (1e-3, 1024), "eval_capacity_factor": (1e-3, 1024),
    "router_jitter": (0, 1), "image_size": (1, 4096), "patch_size": (1, 1024), "in_chans": (1, 64),
    "num_frames": (1, 1024), "tubelet_size": (1, 64), "window_size": (1, 1024), "local_layers": (0, 256),
    "head_topk": (1, 1024), "gate_threshold": (0, 2), "context_length": (1, 8192), "vocab_size": (3, 1_000_000),
    "num_queries": (1, 4096), "num_classes": (1, 1_000_000), "norm_eps": (1e-12, 1), "ln_eps": (1e-12, 1),
    "ls_init": (0, 1e3), "label_smoothing": (0, 1), "init_logit_scale": (1e-6, 1e4),
    "max_logit_scale": (1e-6, 1e4), "init_logit_bias": (-1e4, 1e4), "gate_init": (-1e3, 1e3),
    "image_mean": (-1e3, 1e3), "image_std": (1e-6, 1e3),
}
MAX_PATCHES = 65536  # patches per image (per frame): 4096 px at patch 16, 1792 px at patch 7
DEFAULT_MAX_PARAMS = 4_000_000_000  # 16 GB of float32 weights; large is 1.8B
MAX_PARAMS_ENV = "ERNIE_VL_MAX_PARAMS"


class ModelTooLargeError(ValueError):
    """The config would build more parameters than the limit allows."""


# ---------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Does ``value`` fit annotation ``tp``? (JSON lists count as tuples; ints as floats; bools only as bools.)"""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(_matches(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, dict))
    return isinstance(value, tp) if isinstance(tp, type) else True


def check_field_type(value: Any, tp: Any, where: str) -> None:
    """``TypeError`` naming ``where`` unless ``value`` fits the annotation ``tp``."""
    if not _matches(value, tp):
        raise TypeError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r:.80}")


def check_field_bounds(name: str, value: Any, where: str) -> None:
    """``ValueError`` naming ``where`` when a number (or each number of a tuple) is out of its bounds."""
    if name not in FIELD_BOUNDS or value is None or isinstance(value, (bool, str)):
        return
    low, high = FIELD_BOUNDS[name]
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v) or not low <= v <= high:
                raise ValueError(f"{where} = {v!r} is out of range: it must be in [{low:g}, {high:g}] "
                                 f"(bounds in ernie_vl.limits.FIELD_BOUNDS)")


# ---------------------------------------------------------------------------- whole configs


def validate_config(cfg: Any, where: str = "") -> None:
    """Check every field's type and bounds, recursively, then the cross-field rules of ``cfg``."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value, path)
            continue
        check_field_type(value, hints.get(f.name, Any), path)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path} = {value!r} is not finite")
        check_field_bounds(f.name, value, path)
    _check_relations(cfg, where)


def _check_relations(cfg: Any, where: str) -> None:
    prefix = f"{where}." if where else ""
    names = {f.name for f in dataclasses.fields(cfg)}
    if {"width", "num_heads"} <= names and cfg.width % cfg.num_heads:
        raise ValueError(f"{prefix}num_heads = {cfg.num_heads} does not divide {prefix}width = {cfg.width}")
    if {"num_experts", "top_k"} <= names and cfg.top_k > cfg.num_experts:
        raise ValueError(f"{prefix}top_k = {cfg.top_k} exceeds {prefix}num_experts = {cfg.num_experts}")
    if "group_experts" in names and cfg.routing == "groups" and cfg.group_experts:
        check_field_bounds("num_experts", sum(cfg.group_experts), f"{prefix}sum(group_experts)")
    if {"image_size", "patch_size"} <= names:
        (h, w), (ph, pw) = _pair(cfg.image_size), _pair(cfg.patch_size)
        if (h // ph) * (w // pw) > MAX_PATCHES:
            raise ValueError(f"{prefix}image_size {cfg.image_size} / patch_size {cfg.patch_size} gives "
                             f"{(h // ph) * (w // pw)} patches; at most {MAX_PATCHES}")
    if "class_names" in names and cfg.class_names is not None:
        check_field_bounds("num_classes", len(cfg.class_names), f"{prefix}len(class_names)")


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# ---------------------------------------------------------------------------- parameter count


def estimate_params(cfg: Any) -> int:
    """Parameters ``ErnieVL(cfg)`` would hold: the model built on the meta device (shapes only, no memory).

    Exact and in step with the model code; call it on a validated config (the bounds keep the build short).
    """
    import torch

    from ernie_vl.model import ErnieVL

    with torch.device("meta"):
        model = ErnieVL(cfg)
    return sum(p.numel() for p in model.parameters())


def max_params_limit(max_params: Optional[int] = None) -> int:
    """The parameter limit: ``max_params``, else ``$ERNIE_VL_MAX_PARAMS``, else ``DEFAULT_MAX_PARAMS``."""
    if max_params is None:
        raw = os.environ.get(MAX_PARAMS_ENV)
        if raw is None or not raw.strip():
            return DEFAULT_MAX_PARAMS
        try:
            max_params = int(float(raw))
        except ValueError:
            raise ValueError(f"{MAX_PARAMS_ENV}={raw!r} is not a number of parameters (e.g. 8e9)") from None
    if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
        raise ValueError(f"max_params must be a positive int, got {max_params!r}")
    return max_params


def check_param_budget(cfg: Any, max_params: Optional[int] = None) -> int:
    """The estimated parameter count of ``cfg``; ``ModelTooLargeError`` (with the numbers) over the limit."""
    limit = max_params_limit(max_params)
    import torch

    if torch.get_default_device().type == "meta":
        return 0  # building on the meta device allocates nothing (this is how the count is made)
    count = estimate_params(cfg)
    if count > limit:
        raise ModelTooLargeError(
            f"model {cfg.name!r} would have {count:,} parameters ({count * 4 / 2**30:,.1f} GiB as float32), "
            f"over the limit of {limit:,}; refusing before allocating it. Check the config's sizes, or raise "
            f"the limit with max_params=... or {MAX_PARAMS_ENV}")
    return count
