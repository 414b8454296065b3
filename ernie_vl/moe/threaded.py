"""Expert-parallel kernel: whole experts on single-threaded workers, no intra-op barriers.

The slice loop of :mod:`ernie_vl.moe.grouped` runs every matmul and activation with all
intra-op threads, so each of its ~3 kernels per expert (7 in the backward pass) ends in a
barrier; the padded kernel of :mod:`ernie_vl.moe.padded` has few barriers but pays the
padded rows' FLOPs. Here each of ``torch.get_num_threads()`` persistent worker threads runs
with one intra-op thread (OpenMP and MKL) and takes whole experts from a queue, largest
first: gather its rows, matmul, activation, matmul (backward: recompute the activation,
weight gradients, input gradient), all on one core with no barrier and no padding. A
worker that loses its core to another process simply takes fewer experts.

Every expert's arithmetic runs on one thread with single-threaded kernels, so the result does
not depend on which worker ran it (and equals the one-thread loop bit for bit). Workers write
disjoint row slices of buffers allocated by the caller, and per-thread scratch buffers
(:mod:`ernie_vl.moe.workspace`) for the rest. With one intra-op thread the same tasks run one
after the other on the calling thread. :func:`single_threaded` runs the router's small ops
with one intra-op thread for the same reason (no barriers).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import torch

from .gemm import openblas_products, single_threaded_blas
from .workspace import scratch

_LOCK = threading.Lock()
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_LOCAL = threading.local()


def _init_worker() -> None:
    torch.get_num_threads()  # this thread's lazy thread-count init first, else its first op resets it
    torch.set_num_threads(1)  # thread-local for OpenMP and MKL
    _LOCAL.worker = True


def in_worker() -> bool:
    """True on one of this module's worker threads."""
    return getattr(_LOCAL, "worker", False)


def worker_pool(num_workers: int) -> ThreadPoolExecutor:
    """The persistent pool of ``num_workers`` single-threaded workers (re-created if the count changes)."""
    global _POOL
    with _LOCK:
        if _POOL is None or _POOL[0] != num_workers:
            if _POOL is not None:
                _POOL[1].shutdown(wait=False)
            pool = ThreadPoolExecutor(num_workers, thread_name_prefix="ernie-moe-expert", initializer=_init_worker)
            # start every worker now: torch.set_num_threads(1) in the initializer also sets the
            # count that threads created later start with, so restore it once all have run
            barrier = threading.Barrier(num_workers + 1, timeout=60)
            started = [pool.submit(barrier.wait) for _ in range(num_workers)]
            barrier.wait()
            for f in started:
                f.result()
            torch.set_num_threads(num_workers)
            _POOL = (num_workers, pool)
        return _POOL[1]


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed ops with one intra-op thread on this thread (restored after).

    For the router's many small (tokens, experts) ops: with several intra-op threads each ends
    in a barrier, and while other processes share the cores a barrier can cost a scheduler time
    slice, far more than the op (measured here: the routing ops and losses of one 4096-token
    fwd+bwd took ~5 ms on one thread, ~130 ms with two threads on a loaded machine).
    """
    threads = torch.get_num_threads()
    if threads <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _forget_pool() -> None:  # a forked child has no worker threads
    global _POOL, _LOCK
    _POOL = None
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_tasks(fn: Callable[..., None], tasks: Sequence[tuple], parallel: bool = True) -> None:
    """``fn(*task)`` for every task, under no_grad. With ``parallel`` and several intra-op threads,
    on the workers (each task to the next free worker, in the given order, under the caller's
    inference mode), returning when all are done and re-raising the first error; else inline
    (one thread, or called from a worker)."""
    threads = torch.get_num_threads()
    if not parallel or threads <= 1 or len(tasks) <= 1 or in_worker():
        # single-threaded products on OpenBLAS only when this thread runs one intra-op thread
        blas = single_threaded_blas() if threads <= 1 else nullcontext()
        with torch.no_grad(), blas:
            for task in tasks:
                fn(*task)
        return
    inference = torch.is_inference_mode_enabled()

    with single_threaded_blas() as on_openblas:
        def call(task: tuple) -> None:
            with torch.inference_mode(inference), torch.no_grad(), openblas_products(on_openblas):
                fn(*task)

        futures = [worker_pool(threads).submit(call, task) for task in tasks]
        wait(futures)
    for f in futures:
        f.result()


def expert_tasks(counts: Sequence[int], chunk: int | None = None) -> list[tuple[int, int, int]]:
    """(expert, start, end) row slices of the sorted rows, largest first (the longest tasks start
    first); slices longer than ``chunk`` are split (inference only: weight gradients need whole
    experts)."""
    tasks, start = [], 0
    for e, c in enumerate(counts):
        step = max(c if chunk is None else chunk, 1)
        for s in range(start, start + c, step):
            tasks.append((e, s, min(s + step, start + c)))
        start += c
    return sorted(tasks, key=lambda t: t[1] - t[2])


def experts_inference(x, token_index, counts, kind, act, params, chunk_rows: int, parallel: bool) -> torch.Tensor:
    """Without grad: (N, D) inputs, (M,) token of each sorted row -> (M+1, D) scratch expert
    outputs in sorted order (last row zero); at most ``chunk_rows`` rows per step."""
    from .grouped import act_width, expert_forward, hidden_width

    m, d = token_index.shape[0], x.shape[1]
    rows = scratch("rows_out", (m + 1, d), x)
    rows[m].zero_()
    hw, aw = hidden_width(kind, params), act_width(kind, params)

    def task(e: int, s: int, t: int) -> None:
        n = t - s
        xs = torch.index_select(x, 0, token_index[s:t], out=scratch("rows_in", (n, d), x))
        h = scratch("hidden", (n, hw), x)
        a = h if kind == "mlp" else scratch("act", (n, aw), x)
        expert_forward(kind, act, params, e, xs, h, a, rows[s:t])

    run_tasks(task, expert_tasks(counts, chunk_rows), parallel)
    return rows


def experts_training(x, token_index, counts, kind, act, params,
                     parallel: bool) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """With grad -> (h: per expert its (count, Hw) pre-activations, None when idle; rows (M+1, D)
    expert outputs, last row zero), all fresh (saved for backward).

    One tensor per expert rather than one (M, Hw) block: each stays under glibc's mmap threshold
    (32 MB), so it is served from reused heap memory instead of fresh zero-filled pages.
    """
    from .grouped import act_width, expert_forward, hidden_width

    m, d = token_index.shape[0], x.shape[1]
    hw, aw = hidden_width(kind, params), act_width(kind, params)
    h = [x.new_empty(c, hw) if c > 0 else None for c in counts]
    rows = x.new_empty(m + 1, d)
    rows[m].zero_()

    def task(e: int, s: int, t: int) -> None:
        n = t - s
        xs = torch.index_select(x, 0, token_index[s:t], out=scratch("rows_in", (n, d), x))
        expert_forward(kind, act, params, e, xs, h[e], scratch("act", (n, aw), x), rows[s:t])

    run_tasks(task, expert_tasks(counts), parallel)
    return h, rows


def experts_backward(kind, act, params, grads, counts, x, h, rows, dout, w_sorted, token_index,
                     need_x: bool, need_w: bool, parallel: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every expert's backward pass, its activation recomputed from its saved pre-activations.

    h: per expert (count, Hw) or None; rows (M+1, D) expert outputs; dout (N, D) output
    gradient; w_sorted (M,) router weight of each sorted row. Weight gradients go into
    ``grads`` (idle experts' parts must already be zero). Returns ``dx_sorted`` (M+1, D)
    scratch input gradients of the sorted rows (last row 0) or None, and ``dw_sorted`` (M+1,)
    the gradient of each sorted row's router weight (its expert output dotted with the output
    gradient; last row 0) or None.
    """
    from .grouped import expert_backward

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
        xs = None
        if grads[0] is not None:
            xs = torch.index_select(x, 0, idx, out=scratch("rows_in", (n, d), x))
        expert_backward(kind, act, params, grads, e, dy, xs, h[e], None if dx_sorted is None else dx_sorted[s:t])
        if out_bias_grad is not None:
            torch.sum(dy, dim=0, out=out_bias_grad[e])

    run_tasks(task, expert_tasks(counts), parallel)
    return dx_sorted, dw_sorted
