"""Fused dispatch -> grouped experts -> weighted combine, over tokens sorted by expert.

MegaBlocks-style, tuned for CPU:
- the tokens of expert ``e`` occupy one contiguous slice of the sorted rows, and each expert
  runs once on its slice (measured on CPU: a loop over contiguous slices beat
  ``torch._grouped_mm``); its matmul, activation and weighting run back to back while the
  slice is in cache, writing into preallocated buffers (no per-expert concatenation);
- every data movement is a gather (``index_select``): the un-sort uses the inverse
  permutation instead of a scatter-add, in the forward and in the backward pass;
- the backward pass writes each expert's weight gradient straight into its slice of the
  stacked gradient (autograd through ``weight[e]`` would build a full-size zero tensor per
  expert and add them up).

Assignments are numbered token-major (``a = n * k + j``: token n's j-th choice). A plan gives
``order`` (kept assignments sorted by expert), ``counts`` (rows per expert) and ``inverse``
((N*k,): the sorted row of each assignment, or the sentinel row M when it was dropped); the
combine is one gather and one batched (1 x k) @ (k x D) product per token.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

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


def activation_backward(grad: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:
    """``grad * d act(h) / dh``."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, h, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    if name == "quick_gelu":
        s = torch.sigmoid(h * QUICK_GELU_ALPHA)
        return grad * (s + QUICK_GELU_ALPHA * h * s * (1.0 - s))
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


def spans(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert with at least one row."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if c > 0:
            out.append((e, start, start + c))
        start += c
    return out


def _linear_into(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ w.T (+ b)``, ``w`` in nn.Linear layout (out_features, in_features)."""
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


# ---- expert kernels: one expert on one slice ---------------------------------------------
# params: mlp = (w1 (E,H,D), b1 (E,H)|None, w2 (E,D,H), b2 (E,D)|None);
#         swiglu = (w_gate_up (E,2H,D), w_down (E,D,H)).

def hidden_width(kind: str, params: Sequence[torch.Tensor | None]) -> int:
    """Width of the saved pre-activation buffer."""
    return params[0].shape[1]


def act_width(kind: str, params: Sequence[torch.Tensor | None]) -> int:
    return params[0].shape[1] if kind == "mlp" else params[1].shape[2]


def expert_forward(kind: str, act: str, params, e: int, x: torch.Tensor, h: torch.Tensor,
                   a: torch.Tensor, y: torch.Tensor) -> None:
    """Expert e on rows x: pre-activation -> h, activation -> a, output -> y (all preallocated)."""
    if kind == "mlp":
        w1, b1, w2, b2 = params
        _linear_into(x, w1[e], None if b1 is None else b1[e], h)
        activation_forward(h, act, a)
        _linear_into(a, w2[e], None if b2 is None else b2[e], y)
    else:
        w_gate_up, w_down = params
        hidden = w_down.shape[2]
        torch.mm(x, w_gate_up[e].t(), out=h)
        activation_forward(h[:, :hidden], act, a)
        a.mul_(h[:, hidden:])
        torch.mm(a, w_down[e].t(), out=y)


def expert_backward(kind: str, act: str, params, grads, e: int, dy: torch.Tensor, x: torch.Tensor,
                    h: torch.Tensor, a: torch.Tensor, dx: torch.Tensor | None) -> None:
    """Gradients of expert e on one slice: weight grads into ``grads[i][e]``, input grad into dx."""
    if kind == "mlp":
        w1, _, w2, _ = params
        dw1, db1, dw2, db2 = grads
        if dw2 is not None:
            torch.mm(dy.t(), a, out=dw2[e])
        if db2 is not None:
            torch.sum(dy, dim=0, out=db2[e])
        dh = activation_backward(dy @ w2[e], h, act)
        if dw1 is not None:
            torch.mm(dh.t(), x, out=dw1[e])
        if db1 is not None:
            torch.sum(dh, dim=0, out=db1[e])
        if dx is not None:
            torch.mm(dh, w1[e], out=dx)
        return
    w_gate_up, w_down = params
    dgu_w, ddown = grads
    hidden = w_down.shape[2]
    if ddown is not None:
        torch.mm(dy.t(), a, out=ddown[e])
    da = dy @ w_down[e]
    g, u = h[:, :hidden], h[:, hidden:]
    dh = torch.empty_like(h)
    activation_forward(g, act, dh[:, hidden:])
    dh[:, hidden:].mul_(da)
    torch.mul(da, u, out=dh[:, :hidden])
    dh[:, :hidden] = activation_backward(dh[:, :hidden], g, act)
    if dgu_w is not None:
        torch.mm(dh.t(), x, out=dgu_w[e])
    if dx is not None:
        torch.mm(dh, w_gate_up[e], out=dx)


# ---- the fused layer ---------------------------------------------------------------------

def _combine(rows: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M+1, D) sorted expert outputs (last row = zero sentinel for dropped assignments),
    (N, k) weights -> ((N, D) weighted sum per token, (N, k, D) each token's k rows)."""
    n, top_k = weights.shape
    per_token = rows.index_select(0, inverse).view(n, top_k, rows.shape[1])
    out = torch.bmm(weights.to(rows.dtype).unsqueeze(1), per_token).squeeze(1)
    return out, per_token


INFERENCE_CHUNK_ROWS = 2048  # rows per step without grad: bounds the (rows, hidden) scratch buffer


def _run_experts(x, token_index, counts, kind, act, params, keep_activations: bool):
    """Gather rows by expert and run each expert on its slice -> (xs, h, a, rows (M+1, D)).

    Without ``keep_activations`` (inference) h / a are one small scratch buffer reused for
    every chunk of at most ``INFERENCE_CHUNK_ROWS`` rows (returned as None).
    """
    m, d = token_index.shape[0], x.shape[1]
    xs = x.index_select(0, token_index)
    rows = x.new_empty(m + 1, d)
    rows[m].zero_()
    if not keep_activations:
        chunk = max(1, min(INFERENCE_CHUNK_ROWS, max(counts, default=1)))
        h = x.new_empty(chunk, hidden_width(kind, params))
        a = h if kind == "mlp" else x.new_empty(chunk, act_width(kind, params))
        for e, s, t in spans(counts):
            for c in range(s, t, chunk):
                n = min(chunk, t - c)
                expert_forward(kind, act, params, e, xs[c:c + n], h[:n], a[:n], rows[c:c + n])
        return xs, None, None, rows
    h = x.new_empty(m, hidden_width(kind, params))
    a = x.new_empty(m, act_width(kind, params))
    for e, s, t in spans(counts):
        expert_forward(kind, act, params, e, xs[s:t], h[s:t], a[s:t], rows[s:t])
    return xs, h, a, rows


class MoEExpertsFunction(torch.autograd.Function):
    """out[n] = sum_j w[n, j] * expert_{e(n, j)}(x[n]) over the kept assignments.

    x: (N, D); weights: (N, k); order (M,), token_index (M,), inverse (N*k,), counts (E ints)
    from a token-major plan (assignment ``a = n * k + j``); kind: "mlp" | "swiglu";
    act: activation name; params: the stacked expert tensors.
    """

    @staticmethod
    def forward(ctx, x, weights, order, token_index, inverse, counts, kind, act, *params):  # type: ignore[override]
        xs, h, a, rows = _run_experts(x, token_index, counts, kind, act, params, keep_activations=True)
        out, per_token = _combine(rows, inverse, weights)
        ctx.meta = (counts, kind, act)
        ctx.save_for_backward(xs, h, a, per_token, weights, order, token_index, inverse, *params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        counts, kind, act = ctx.meta
        xs, h, a, per_token, weights, order, token_index, inverse, *params = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_w, need_params = need[0], need[1], need[8:]
        m, d = xs.shape
        n, top_k = weights.shape
        dout = dout.contiguous()
        # every expert with rows writes its whole gradient slice; only idle experts need zeros
        grads = [torch.empty_like(p) if (p is not None and nd) else None for p, nd in zip(params, need_params)]
        idle = [e for e, c in enumerate(counts) if c == 0]
        for g in grads:
            if g is not None and idle:
                g[idle] = 0
        dweights = None
        if need_w:
            dweights = torch.bmm(per_token, dout.unsqueeze(2)).squeeze(2).to(weights.dtype)
        w_sorted = weights.reshape(-1).index_select(0, order).to(xs.dtype)
        dy = dout.index_select(0, token_index).mul_(w_sorted[:, None])
        dx_sorted = xs.new_empty(m + 1, d) if need_x else None
        if dx_sorted is not None:
            dx_sorted[m].zero_()
        for e, s, t in spans(counts):
            expert_backward(kind, act, params, grads, e, dy[s:t], xs[s:t], h[s:t], a[s:t],
                            None if dx_sorted is None else dx_sorted[s:t])
        dx = None
        if dx_sorted is not None:
            dx = dx_sorted.index_select(0, inverse).view(n, top_k, d).sum(1)
        return (dx, dweights, None, None, None, None, None, None, *grads)


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
    tensors = (x, weights, *params)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return MoEExpertsFunction.apply(x, weights, order, token_index, inverse, counts, kind, act, *params)
    _, _, _, rows = _run_experts(x, token_index, counts, kind, act, params, keep_activations=False)
    return _combine(rows, inverse, weights)[0]
