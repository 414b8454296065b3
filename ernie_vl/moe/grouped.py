"""Fused dispatch -> grouped experts -> weighted combine, over tokens sorted by expert.

MegaBlocks-style, tuned for CPU:
- the tokens of expert ``e`` occupy one contiguous slice of the sorted rows, and each expert
  runs once on its slice (measured on CPU: a loop over contiguous slices beat
  ``torch._grouped_mm``); experts without tokens are skipped; its matmul, activation and
  second matmul run back to back on one slice (products and activation written ``out=`` into
  preallocated buffers, no per-expert concatenation; the products go through
  :mod:`ernie_vl.moe.gemm`, which runs them on numpy's OpenBLAS where that is faster);
- temporaries that never leave a call (gathered rows, one expert's activations, the
  backward's gradient slices) are per-thread scratch buffers reused across calls
  (:mod:`ernie_vl.moe.workspace`): a fresh 64 MB tensor costs ~45 ms of page faults on one
  core here, more than the activation itself;
- training saves only the pre-activations ``h`` (one tensor per expert, each small enough to
  be served from reused heap memory) and the sorted expert outputs (for the router-weight
  gradient); the backward pass recomputes each expert's activation, so the (rows, hidden)
  activation is never stored;
- every data movement is a gather (``index_select``): the un-sort uses the inverse
  permutation instead of a scatter-add, in the forward and in the backward pass;
- the backward pass writes each expert's weight gradient straight into its slice of the
  stacked gradient (autograd through ``weight[e]`` would build a full-size zero tensor per
  expert and add them up).

The per-expert work (gather, matmul, activation, matmul; in the backward pass recompute,
weight gradients, input gradient) is one task per expert (:mod:`ernie_vl.moe.threaded`).
With one intra-op thread the tasks run one after the other on the calling thread (the
"loop" kernel); with several, on as many single-threaded worker threads, each taking whole
experts, largest first (the "threads" kernel: no intra-op barriers and no padding; measured
faster here than the padded batched kernel of :mod:`ernie_vl.moe.padded`, which stays
selectable). All give the same result up to float rounding (tests/test_moe_kernels.py).

Assignments are numbered token-major (``a = n * k + j``: token n's j-th choice). A plan gives
``order`` (kept assignments sorted by expert), ``counts`` (rows per expert) and ``inverse``
((N*k,): the sorted row of each assignment, or the sentinel row M when it was dropped); the
combine is one gather and one batched (1 x k) @ (k x D) product per token, so each token's
sum runs over its choices in slot order whatever the order of the batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import gemm
from .padded import PaddedLayout, padded_backward, padded_forward, padded_layout
from .threaded import experts_backward, experts_inference, experts_training
from .workspace import scratch

# "auto": with several intra-op threads and several busy experts the expert-parallel kernel
# (ernie_vl/moe/threaded.py), else the slice loop; "loop" / "padded" / "threads" force one
# (tests, benchmarks)
KERNEL = "auto"
KERNELS = ("auto", "loop", "padded", "threads")

QUICK_GELU_ALPHA = 1.702





def activation_forward(h: torch.Tensor, name: str, out: torch.Tensor) -> torch.Tensor:
    """``out = act(h)`` (``out`` may be ``h``)."""
    if name == "gelu":
        return torch.ops.aten.gelu.out(h, approximate="none", out=out)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu.out(h, approximate="tanh", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(h, out=out)
    if name == "quick_gelu":
        return torch.mul(h, torch.sigmoid(h * QUICK_GELU_ALPHA), out=out)
    raise ValueError(f"unknown activation {name!r}")


def activation_backward(grad: torch.Tensor, h: torch.Tensor, name: str,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad * d act(h) / dh``, into ``out`` when given (``out`` may be ``grad``)."""
    if out is None:
        out = torch.empty_like(grad)
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate="none", grad_input=out)
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward.grad_input(grad, h, approximate="tanh", grad_input=out)
    if name == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, h, grad_input=out)
    if name == "quick_gelu":
        s = torch.sigmoid(h * QUICK_GELU_ALPHA)
        return torch.mul(grad, s + QUICK_GELU_ALPHA * h * s * (1.0 - s), out=out)
    raise ValueError(f"unknown activation {name!r}")


def activation_fn(name: str):
    """The differentiable activation ``name`` as a function of one tensor."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda h: F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu
    if name == "quick_gelu":
        return lambda h: h * torch.sigmoid(QUICK_GELU_ALPHA * h)
    raise ValueError(f"unknown activation {name!r}")


def _linear_into(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ w.T (+ b)``, ``w`` in nn.Linear layout (out_features, in_features)."""
    gemm.addmm(b, x, w.t(), out)


# ---- expert kernels: one expert on one slice ---------------------------------------------
# params: mlp = (w1 (E,H,D), b1 (E,H)|None, w2 (E,D,H), b2 (E,D)|None);
#         swiglu = (w_gate_up (E,2H,D), w_down (E,D,H)).

def hidden_width(kind: str, params: Sequence[torch.Tensor | None]) -> int:
    """Width of the pre-activation ``h`` (H for mlp, 2H = [gate; up] for swiglu)."""
    return params[0].shape[1]


def act_width(kind: str, params: Sequence[torch.Tensor | None]) -> int:
    """Width of the activation fed to the second matmul (H)."""
    return params[0].shape[1] if kind == "mlp" else params[1].shape[2]


def expert_activation(kind: str, act: str, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a = act(h)`` (mlp; ``a`` may be ``h``) or ``act(gate) * up`` (swiglu, h = [gate | up])."""
    if kind == "mlp":
        return activation_forward(h, act, a)
    hidden = a.shape[1]
    activation_forward(h[:, :hidden], act, a)
    return a.mul_(h[:, hidden:])


def expert_forward(kind: str, act: str, params, e: int, x: torch.Tensor, h: torch.Tensor,
                   a: torch.Tensor, y: torch.Tensor) -> None:
    """Expert e on rows x: pre-activation -> h, activation -> a (may be h for mlp), output -> y."""
    if kind == "mlp":
        w1, b1, w2, b2 = params
        _linear_into(x, w1[e], None if b1 is None else b1[e], h)
        activation_forward(h, act, a)
        _linear_into(a, w2[e], None if b2 is None else b2[e], y)
    else:
        w_gate_up, w_down = params
        gemm.mm(x, w_gate_up[e].t(), h)
        expert_activation(kind, act, h, a)
        gemm.mm(a, w_down[e].t(), y)


def expert_backward(kind: str, act: str, params, grads, e: int, dy: torch.Tensor, x: torch.Tensor | None,
                    h: torch.Tensor, dx: torch.Tensor | None) -> None:
    """Gradients of expert e on one slice of n rows, the activation recomputed from ``h``.

    dy (n, D) weighted output gradient, x (n, D) input rows (needed for the first weight's
    gradient), h (n, Hw) saved pre-activation; weight grads go into ``grads[i][e]``, the
    input gradient into dx (n, D). Scratch slots: ``bwd_act``, ``bwd_grad``, ``bwd_dh``.
    """
    n = dy.shape[0]
    second_w, second_grad = params[2 if kind == "mlp" else 1], grads[2 if kind == "mlp" else 1]
    hidden = second_w.shape[2]
    if second_grad is not None:
        a = expert_activation(kind, act, h, scratch("bwd_act", (n, hidden), h))
        gemm.mm(dy.t(), a, second_grad[e])
    first_grad = grads[0]
    first_bias_grad = grads[1] if kind == "mlp" else None
    if first_grad is None and first_bias_grad is None and dx is None:
        return
    da = gemm.mm(dy, second_w[e], scratch("bwd_grad", (n, hidden), h))
    if kind == "mlp":
        dh = activation_backward(da, h, act, out=da)
    else:
        g, u = h[:, :hidden], h[:, hidden:]
        dh = scratch("bwd_dh", (n, 2 * hidden), h)
        activation_forward(g, act, dh[:, hidden:]).mul_(da)  # d up = act(gate) * da
        torch.mul(da, u, out=dh[:, :hidden])
        activation_backward(dh[:, :hidden], g, act, out=dh[:, :hidden])  # d gate
    if first_grad is not None:
        gemm.mm(dh.t(), x, first_grad[e])
    if first_bias_grad is not None:
        torch.sum(dh, dim=0, out=first_bias_grad[e])
    if dx is not None:
        gemm.mm(dh, params[0][e], dx)


# ---- the fused layer ---------------------------------------------------------------------

def _combine(rows: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(M+1, D) sorted expert outputs (last row = zero sentinel for dropped assignments),
    (N, k) weights -> (N, D) fresh tensor, each token's weighted sum over its k rows."""
    n, top_k = weights.shape
    d = rows.shape[1]
    per_token = torch.index_select(rows, 0, inverse, out=scratch("per_token", (n * top_k, d), rows))
    return torch.bmm(weights.to(rows.dtype).unsqueeze(1), per_token.view(n, top_k, d)).squeeze(1)


INFERENCE_CHUNK_ROWS = 2048  # rows per step without grad: bounds the (rows, hidden) scratch buffers


class MoEExpertsFunction(torch.autograd.Function):
    """out[n] = sum_j w[n, j] * expert_{e(n, j)}(x[n]) over the kept assignments.

    x: (N, D); weights: (N, k); order (M,), token_index (M,), inverse (N*k,), counts (E ints)
    from a token-major plan (assignment ``a = n * k + j``); parallel: run the experts on the
    single-threaded workers of :mod:`ernie_vl.moe.threaded` (else one after the other on this
    thread); kind: "mlp" | "swiglu"; act: activation name; params: the stacked expert tensors.
    Saves x, each busy expert's pre-activations h (count, Hw) and the expert outputs (M+1, D);
    the backward pass re-gathers x and recomputes each expert's activation.
    """

    @staticmethod
    def forward(ctx, x, weights, order, token_index, inverse, counts, parallel, kind, act, *params):  # type: ignore[override]
        h, rows = experts_training(x, token_index, counts, kind, act, params, parallel)
        ctx.meta = (counts, parallel, kind, act, len(params))
        ctx.save_for_backward(x, rows, weights, order, token_index, inverse, *params,
                              *[t for t in h if t is not None])
        return _combine(rows, inverse, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        counts, parallel, kind, act, num_params = ctx.meta
        x, rows, weights, order, token_index, inverse, *rest = ctx.saved_tensors
        params, busy = rest[:num_params], iter(rest[num_params:])
        h = [next(busy) if c > 0 else None for c in counts]
        need = ctx.needs_input_grad
        n, top_k = weights.shape
        d = x.shape[1]
        # every expert with rows writes its whole gradient slice; only idle experts need zeros
        grads = [torch.empty_like(p) if (p is not None and nd) else None for p, nd in zip(params, need[9:])]
        idle = [e for e, c in enumerate(counts) if c == 0]
        for g in grads:
            if g is not None and idle:
                g[idle] = 0
        w_sorted = weights.reshape(-1).index_select(0, order).to(x.dtype)
        dx_sorted, dw_sorted = experts_backward(kind, act, params, grads, counts, x, h, rows, dout.contiguous(),
                                                w_sorted, token_index, need[0], need[1], parallel)
        dweights = None if dw_sorted is None else dw_sorted.index_select(0, inverse).view(n, top_k).to(weights.dtype)
        dx = None
        if dx_sorted is not None:  # each token's sum over its k rows (dropped: the zero row)
            per_token = torch.index_select(dx_sorted, 0, inverse, out=scratch("per_token", (n * top_k, d), x))
            dx = per_token.view(n, top_k, d).sum(1)
        return (dx, dweights, None, None, None, None, None, None, None, *grads)


class PaddedExpertsFunction(torch.autograd.Function):
    """Same result as :class:`MoEExpertsFunction`, computed on (E, C) padded blocks
    (:mod:`ernie_vl.moe.padded`); saves x, h (E, C, Hw) and the padded outputs."""

    @staticmethod
    def forward(ctx, x, weights, order, token_index, inverse, counts, kind, act, *params):  # type: ignore[override]
        layout = padded_layout(counts, order, token_index, inverse, weights)
        num_experts, cap, d = len(counts), layout.capacity, x.shape[1]
        h = x.new_empty(num_experts, cap, hidden_width(kind, params))
        a = scratch("act", (num_experts, cap, act_width(kind, params)), x)
        rows = x.new_empty(num_experts * cap + 1, d)
        padded_forward(kind, act, params, x, layout, h, a, rows)
        ctx.meta = (kind, act, cap)
        ctx.save_for_backward(x, h, rows, weights, layout.pad_token, layout.pad_inverse, layout.pad_weight, *params)
        return _combine(rows, layout.pad_inverse, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        kind, act, cap = ctx.meta
        x, h, rows, weights, pad_token, pad_inverse, pad_weight, *params = ctx.saved_tensors
        layout = PaddedLayout(cap, pad_token, pad_inverse, pad_weight)
        need = ctx.needs_input_grad
        n, top_k = weights.shape
        d = x.shape[1]
        dout = dout.contiguous()
        grads = [torch.empty_like(p) if (p is not None and nd) else None for p, nd in zip(params, need[8:])]
        dweights = None
        if need[1]:
            per_token = torch.index_select(rows, 0, pad_inverse, out=scratch("per_token", (n * top_k, d), rows))
            dweights = torch.bmm(per_token.view(n, top_k, d), dout.unsqueeze(2)).squeeze(2).to(weights.dtype)
        dx_padded = padded_backward(kind, act, params, grads, x, layout, h, dout, need[0])
        dx = None
        if dx_padded is not None:
            per_token = torch.index_select(dx_padded, 0, pad_inverse, out=scratch("per_token", (n * top_k, d), x))
            dx = per_token.view(n, top_k, d).sum(1)
        return (dx, dweights, None, None, None, None, None, None, *grads)


def _padded_inference(x, weights, order, token_index, inverse, counts, kind, act, params) -> torch.Tensor:
    layout = padded_layout(counts, order, token_index, inverse, weights)
    num_experts, cap, d = len(counts), layout.capacity, x.shape[1]
    h = scratch("hidden", (num_experts, cap, hidden_width(kind, params)), x)
    a = h if kind == "mlp" else scratch("act", (num_experts, cap, act_width(kind, params)), x)
    rows = scratch("rows_out", (num_experts * cap + 1, d), x)
    padded_forward(kind, act, params, x, layout, h, a, rows)
    return _combine(rows, layout.pad_inverse, weights)


def choose_kernel(counts: Sequence[int]) -> str:
    """"padded" or "loop" for these per-expert row counts (see ``KERNEL``)."""
    if KERNEL not in KERNELS:
        raise ValueError(f"grouped.KERNEL must be one of {KERNELS}, got {KERNEL!r}")
    if sum(counts) == 0:
        return "loop"
    if KERNEL != "auto":
        return KERNEL
    busy = sum(1 for c in counts if c > 0)
    return "threads" if torch.get_num_threads() > 1 and busy > 1 else "loop"


def moe_experts(x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token_index: torch.Tensor,
                inverse: torch.Tensor, counts: list[int], kind: str, act: str,
                params: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Differentiable fused experts (see :class:`MoEExpertsFunction`); a lean path without grad.

    ``x`` is cast to the experts' dtype and the result back to ``x``'s dtype.
    """
    in_dtype = x.dtype
    if x.dtype != params[0].dtype:
        return moe_experts(x.to(params[0].dtype), weights, order, token_index, inverse, counts, kind, act,
                           params).to(in_dtype)
    x = x.contiguous()
    kernel = choose_kernel(counts)
    tensors = (x, weights, *params)
    parallel = kernel == "threads"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if kernel == "padded":
            return PaddedExpertsFunction.apply(x, weights, order, token_index, inverse, counts, kind, act, *params)
        return MoEExpertsFunction.apply(x, weights, order, token_index, inverse, counts, parallel, kind, act, *params)
    if kernel == "padded":
        return _padded_inference(x, weights, order, token_index, inverse, counts, kind, act, params)
    rows = experts_inference(x, token_index, counts, kind, act, params, INFERENCE_CHUNK_ROWS, parallel)
    return _combine(rows, inverse, weights)
