"""Fused CPU experts over tokens sorted by expert: one task per expert, scratch buffers, recompute.

The same function as the layer's reference dispatch (``ernie_vl/moe/layer.py``), tuned for CPU:

- each expert runs once on its contiguous slice of the sorted rows: gather, product, activation
  in place, product, written ``out=`` into preallocated buffers (no per-expert concatenation);
  experts without tokens are skipped;
- one task per expert (:mod:`.pool`): inline on the calling thread (``parallel=False``, or one
  intra-op thread), or on single-threaded workers, whole experts each, largest first;
- temporaries that never leave a call are per-thread scratch buffers (:mod:`.workspace`): a
  fresh 64 MB tensor costs tens of ms of page faults on one core, more than its activation;
- training saves only the pre-activations ``h`` (one tensor per expert, each small enough to be
  served from reused heap memory) and the sorted expert outputs (for the router-weight
  gradient); the backward pass recomputes each expert's activation;
- every data movement is a gather (``index_select``): the un-sort uses the inverse permutation,
  never a scatter-add; each expert's weight gradient is written straight into its slice of the
  stacked gradient.

Assignments are numbered token-major (``a = n * k + j``); ``order`` (M,) kept assignments sorted
by expert, ``token_index`` (M,) their tokens, ``inverse`` (N*k,) the sorted row of each assignment
(M, a zero sentinel row, when dropped), ``counts`` rows per expert (python ints).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .expert_ops import act_width, expert_backward, expert_forward, hidden_width
from .pool import expert_tasks, run_tasks
from .products import Products
from .workspace import scratch

INFERENCE_CHUNK_ROWS = 2048  # rows per task without grad: bounds the (rows, hidden) scratch buffers


def combine(rows: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """(M+1, D) sorted rows (last row zero) -> (N, D) fresh tensor: each token's sum over its k rows
    in slot order, each row times its (N, k) ``weights`` (None: unweighted).

    One gather per slot into a (N, D) buffer and one fused multiply-add into the output: no
    (N, k, D) intermediate (``bmm`` of (1, k) x (k, D) matrices and ``sum(1)`` over a middle dim
    of size k were each several times slower than the gathers on a CPU).
    """
    n = inverse.shape[0] // top_k
    slots = inverse.view(n, top_k).t()
    w = None if weights is None else weights.to(rows.dtype)
    out = torch.index_select(rows, 0, slots[0].contiguous())
    if w is not None:
        out.mul_(w[:, :1])
    if top_k > 1:
        buf = scratch("per_slot", (n, rows.shape[1]), rows)
        for j in range(1, top_k):
            row = torch.index_select(rows, 0, slots[j].contiguous(), out=buf)
            if w is None:
                out.add_(row)
            else:
                out.addcmul_(row, w[:, j:j + 1])
    return out


def _run(fn, tasks, parallel: bool, products: Products) -> None:
    with products.phase():
        run_tasks(fn, tasks, parallel)


def experts_inference(x, token_index, counts, kind, act, params, parallel: bool, products: Products) -> torch.Tensor:
    """Without grad: (N, D) inputs -> (M+1, D) scratch expert outputs in sorted order (last row zero),
    at most ``INFERENCE_CHUNK_ROWS`` rows per task."""
    m, d = token_index.shape[0], x.shape[1]
    rows = scratch("rows_out", (m + 1, d), x)
    rows[m].zero_()
    hw, aw = hidden_width(kind, params), act_width(kind, params)

    def task(e: int, s: int, t: int) -> None:
        n = t - s
        xs = torch.index_select(x, 0, token_index[s:t], out=scratch("rows_in", (n, d), x))
        h = scratch("hidden", (n, hw), x)
        a = h if kind == "mlp" else scratch("act", (n, aw), x)
        expert_forward(kind, act, params, e, xs, h, a, rows[s:t], products)

    _run(task, expert_tasks(counts, INFERENCE_CHUNK_ROWS), parallel, products)
    return rows


def experts_training(x, token_index, counts, kind, act, params, parallel: bool,
                     products: Products) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """With grad -> (h: per expert its (count, Hw) pre-activations, None when idle; rows (M+1, D)
    expert outputs, last row zero), all fresh (saved for backward)."""
    m, d = token_index.shape[0], x.shape[1]
    hw, aw = hidden_width(kind, params), act_width(kind, params)
    h = [x.new_empty(c, hw) if c > 0 else None for c in counts]
    rows = x.new_empty(m + 1, d)
    rows[m].zero_()

    def task(e: int, s: int, t: int) -> None:
        n = t - s
        xs = torch.index_select(x, 0, token_index[s:t], out=scratch("rows_in", (n, d), x))
        expert_forward(kind, act, params, e, xs, h[e], scratch("act", (n, aw), x), rows[s:t], products)

    _run(task, expert_tasks(counts), parallel, products)
    return h, rows


def experts_backward(kind, act, params, grads, counts, x, h, rows, dout, w_sorted, token_index,
                     need_x: bool, need_w: bool, parallel: bool,
                     products: Products) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every expert's backward pass, its activation recomputed from its saved pre-activations.

    Weight gradients go into ``grads`` (idle experts' parts must already be zero). Returns
    ``dx_sorted`` (M+1, D) scratch input gradients of the sorted rows (last row 0) or None, and
    ``dw_sorted`` (M+1,) each sorted row's router-weight gradient (last row 0) or None.
    """
    m, d = token_index.shape[0], x.shape[1]
    dx_sorted = dw_sorted = None
    if need_x:
        dx_sorted = scratch("dx_sorted", (m + 1, d), x)
        dx_sorted[m].zero_()
    if need_w:
        dw_sorted = x.new_zeros(m + 1)
    out_bias_grad = grads[3] if kind == "mlp" else None

    def task(e: int, s: int, t: int) -> None:
        n = t - s
        idx = token_index[s:t]
        dy = torch.index_select(dout, 0, idx, out=scratch("dy", (n, d), dout))
        if dw_sorted is not None:
            torch.sum(torch.mul(rows[s:t], dy, out=scratch("dw_prod", (n, d), dy)), dim=1, out=dw_sorted[s:t])
        dy.mul_(w_sorted[s:t, None])
        xs = None if grads[0] is None else torch.index_select(x, 0, idx, out=scratch("rows_in", (n, d), x))
        expert_backward(kind, act, params, grads, e, dy, xs, h[e], None if dx_sorted is None else dx_sorted[s:t],
                        products)
        if out_bias_grad is not None:
            torch.sum(dy, dim=0, out=out_bias_grad[e])

    _run(task, expert_tasks(counts), parallel, products)
    return dx_sorted, dw_sorted


class FusedExperts(torch.autograd.Function):
    """out[n] = sum_j w[n, j] * expert_{e(n, j)}(x[n]) over the kept assignments.

    Saves x, each busy expert's pre-activations and the sorted expert outputs; the backward
    pass re-gathers x and recomputes each expert's activation.
    """

    @staticmethod
    def forward(ctx, x, weights, order, token_index, inverse, counts, parallel, products, kind, act,
                *params):  # type: ignore[override]
        h, rows = experts_training(x, token_index, counts, kind, act, params, parallel, products)
        ctx.meta = (counts, parallel, products, kind, act, len(params))
        ctx.save_for_backward(x, rows, weights, order, token_index, inverse, *params,
                              *[t for t in h if t is not None])
        return combine(rows, inverse, weights, weights.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        counts, parallel, products, kind, act, num_params = ctx.meta
        x, rows, weights, order, token_index, inverse, *rest = ctx.saved_tensors
        params, busy = rest[:num_params], iter(rest[num_params:])
        h = [next(busy) if c > 0 else None for c in counts]
        need = ctx.needs_input_grad
        n, top_k = weights.shape
        # every busy expert writes its whole gradient slice; only idle experts need zeros
        grads = [torch.empty_like(p) if (p is not None and nd) else None for p, nd in zip(params, need[10:])]
        idle = [e for e, c in enumerate(counts) if c == 0]
        for g in grads:
            if g is not None and idle:
                g[idle] = 0
        w_sorted = weights.reshape(-1).index_select(0, order).to(x.dtype)
        dx_sorted, dw_sorted = experts_backward(kind, act, params, grads, counts, x, h, rows, dout.contiguous(),
                                                w_sorted, token_index, need[0], need[1], parallel, products)
        dweights = None if dw_sorted is None else dw_sorted.index_select(0, inverse).view(n, top_k).to(weights.dtype)
        # each token's sum over its k rows (dropped: the zero row)
        dx = None if dx_sorted is None else combine(dx_sorted, inverse, None, top_k)
        return (dx, dweights, None, None, None, None, None, None, None, None, *grads)


def fused_experts(x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token_index: torch.Tensor,
                  inverse: torch.Tensor, counts: list[int], kind: str, act: str,
                  params: Sequence[torch.Tensor | None], parallel: bool, products: Products) -> torch.Tensor:
    """(N, D) tokens -> (N, D) weighted expert outputs; differentiable when anything needs a grad,
    a lean chunked path otherwise. ``x`` must have the experts' dtype."""
    x = x.contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weights, *params)):
        return FusedExperts.apply(x, weights, order, token_index, inverse, counts, parallel, products, kind, act,
                                  *params)
    rows = experts_inference(x, token_index, counts, kind, act, params, parallel, products)
    return combine(rows, inverse, weights, weights.shape[1])
