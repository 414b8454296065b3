"""Nested training state <-> (tensors, JSON skeleton), with an explicit allow-list of types.

A training state (model / optimizer / scheduler / sampler / RNG states) is a tree of
dicts, lists and tuples whose leaves are tensors, numpy arrays, numpy RandomStates and
plain scalars. :func:`pack` splits it into a flat ``{name: tensor}`` dict (for
safetensors) and a JSON-ready skeleton; :func:`unpack` rebuilds the tree exactly (dict
key types, tuples vs lists, numpy dtypes, non-finite floats). Nothing is unpickled: an
unknown type is a ``TypeError`` at save time and an unknown tag a ``ValueError`` at load.

Skeleton encoding: ``None``, ``bool``, ``int``, ``str`` and finite ``float`` are bare JSON
values; every other value is a one-key JSON object naming its kind:
``{"dict": [[key, value], ...]}``, ``{"list": [...]}``, ``{"tuple": [...]}``,
``{"float": "nan" | "inf" | "-inf"}``, ``{"tensor": name}``,
``{"ndarray": name, "dtype": "<u4", "shape": [...]}`` (raw bytes in a uint8 tensor) and
``{"random_state": <tuple>}`` (``numpy.random.RandomState.get_state()``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# numpy dtype kinds an ndarray leaf may have: bool, signed / unsigned int, float, complex
_ARRAY_KINDS = "biufc"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def pack(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` -> (JSON-ready skeleton, ``{name: contiguous CPU tensor}``)."""
    tensors: dict[str, torch.Tensor] = {}

    def tensor_leaf(t: torch.Tensor) -> str:
        name = f"t{len(tensors)}"
        tensors[name] = t.detach().cpu().contiguous().clone()  # own storage: safetensors refuses shared
        return name

    def enc(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
            return int(value)
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, (float, np.floating)):
            value = float(value)
            if math.isfinite(value):
                return value
            return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, torch.Tensor):
            return {"tensor": tensor_leaf(value)}
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in _ARRAY_KINDS:
                raise TypeError(f"training state at {where}: numpy dtype {value.dtype} cannot be saved "
                                f"(allowed kinds: bool, int, uint, float, complex)")
            raw = np.ascontiguousarray(value)
            flat = torch.from_numpy(raw.reshape(-1).view(np.uint8).copy())
            return {"ndarray": tensor_leaf(flat), "dtype": raw.dtype.str, "shape": list(raw.shape)}
        if isinstance(value, np.random.RandomState):
            return {"random_state": enc(value.get_state(), f"{where}.get_state()")}
        if isinstance(value, dict):
            return {"dict": [[enc(k, f"{where} key"), enc(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if isinstance(value, list):
            return {"list": [enc(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, tuple):
            return {"tuple": [enc(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        raise TypeError(f"training state at {where}: a {type(value).__module__}.{type(value).__qualname__} "
                        f"cannot be saved; allowed are dict, list, tuple, str, int, float, bool, None, "
                        f"torch.Tensor, numpy arrays and numpy RandomState")

    return enc(state, "state"), tensors


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor], source: str = "training state") -> Any:
    """Inverse of :func:`pack`; a malformed skeleton raises ``ValueError`` naming ``source``."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{source} is malformed: {what}")

    def tensor(name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise bad(f"it refers to a tensor {name!r} that the file does not hold")
        return tensors[name]

    def dec(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, dict) or len(node) not in (1, 3):
            raise bad(f"unexpected node {str(node)[:80]!r}")
        if "ndarray" in node:
            try:
                dtype = np.dtype(str(node.get("dtype")))
            except TypeError:
                raise bad(f"unknown ndarray dtype {node.get('dtype')!r}") from None
            if dtype.kind not in _ARRAY_KINDS or not isinstance(node.get("shape"), list):
                raise bad(f"ndarray of dtype {dtype} / shape {node.get('shape')!r}")
            raw = tensor(node["ndarray"]).numpy().tobytes()
            return np.frombuffer(raw, dtype=dtype).reshape(node["shape"]).copy()
        (kind, body), = node.items()
        if kind == "tensor":
            return tensor(body)
        if kind == "float" and body in _NONFINITE:
            return _NONFINITE[body]
        if kind in ("list", "tuple", "dict") and isinstance(body, list):
            if kind == "list":
                return [dec(v) for v in body]
            if kind == "tuple":
                return tuple(dec(v) for v in body)
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in body):
                raise bad("a dict entry is not a [key, value] pair")
            return {dec(k): dec(v) for k, v in body}
        if kind == "random_state":
            rs = np.random.RandomState()
            rs.set_state(dec(body))
            return rs
        raise bad(f"unknown node kind {kind!r}")

    return dec(skeleton)
