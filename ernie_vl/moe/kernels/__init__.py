"""Fast expert kernels behind one explicit ``backend=`` argument (see :mod:`.choose`).

Leaves of ``ernie_vl.moe``: they import only each other, downward (``choose`` -> ``fused`` ->
``expert_ops`` -> ``products`` / ``pool`` / ``workspace``), plus ``moe/activation.py`` and
``ernie_vl/runtime.py``; never the layer. Each is tested against the layer's reference dispatch,
output and every gradient (tests/test_moe_kernels.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .choose import BACKENDS, BackendChoice, check_backend, choose_backend
from .fused import fused_experts
from .pool import single_threaded
from .products import TORCH, openblas_products
from .workspace import release_workspace

__all__ = ["BACKENDS", "BackendChoice", "check_backend", "choose_backend", "release_workspace", "run_experts",
           "single_threaded"]


def run_experts(backend: str, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                token_index: torch.Tensor, inverse: torch.Tensor, counts: list[int], kind: str, act: str,
                params: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """(N, D) tokens -> (N, D) sum of each token's weighted expert outputs on ``backend``
    ("loop" | "threads" | "openblas"; "auto" and "reference" are the layer's to resolve).

    ``x`` is cast to the experts' dtype and the result back to ``x``'s dtype.
    """
    if backend not in ("loop", "threads", "openblas"):
        raise ValueError(f"run_experts runs 'loop', 'threads' or 'openblas', got {backend!r}")
    in_dtype = x.dtype
    products = openblas_products() if backend == "openblas" else TORCH
    y = fused_experts(x.to(params[0].dtype), weights, order, token_index, inverse, counts, kind, act, params,
                      parallel=backend != "loop", products=products)
    return y.to(in_dtype)
