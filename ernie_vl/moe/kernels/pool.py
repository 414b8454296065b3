"""Persistent single-threaded workers for expert-parallel kernels, and a one-thread scope.

Each of ``torch.get_num_threads()`` worker threads runs with one intra-op thread (OpenMP and MKL)
and takes whole tasks (experts) from a queue, largest first: no intra-op barriers, no padding. A
worker that loses its core to another process simply takes fewer tasks. Every task's arithmetic
runs on one thread with single-threaded kernels, so a result does not depend on which worker ran
it (and equals the one-thread loop bit for bit).

``torch.set_num_threads(1)`` in a worker is thread-local for OpenMP and MKL but also sets the count
that threads created later start with, so the pool restores the caller's count once its workers
have started. :func:`single_threaded` runs a block of small ops with one intra-op thread.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

_LOCK = threading.Lock()
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_LOCAL = threading.local()


def _init_worker() -> None:
    torch.get_num_threads()  # this thread's lazy thread-count init first, else its first op resets it
    torch.set_num_threads(1)
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
            barrier = threading.Barrier(num_workers + 1, timeout=60)  # start every worker now
            started = [pool.submit(barrier.wait) for _ in range(num_workers)]
            barrier.wait()
            for f in started:
                f.result()
            torch.set_num_threads(num_workers)  # what the callers run with (see the module docstring)
            _POOL = (num_workers, pool)
        return _POOL[1]


def _forget_pool() -> None:  # a forked child has no worker threads
    global _POOL, _LOCK
    _POOL = None
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed ops with one intra-op thread on this thread (restored after).

    For many small ops (the router's (tokens, experts) ops): with several intra-op threads each
    ends in a barrier, and while other processes share the cores a barrier can cost a scheduler
    time slice, far more than the op.
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


def run_tasks(fn: Callable[..., None], tasks: Sequence[tuple], parallel: bool = True) -> None:
    """``fn(*task)`` for every task, under no_grad.

    With ``parallel`` and several intra-op threads: on the workers (each task to the next free
    worker, in the given order, under the caller's inference mode), returning when all are done
    and re-raising the first error. Else inline, one after the other (one thread, or called from
    a worker).
    """
    threads = torch.get_num_threads()
    if not parallel or threads <= 1 or len(tasks) <= 1 or in_worker():
        with torch.no_grad():
            for task in tasks:
                fn(*task)
        return
    inference = torch.is_inference_mode_enabled()

    def call(task: tuple) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            fn(*task)

    futures = [worker_pool(threads).submit(call, task) for task in tasks]
    wait(futures)
    for f in futures:
        f.result()


def expert_tasks(counts: Sequence[int], chunk: int | None = None) -> list[tuple[int, int, int]]:
    """(expert, start, end) row slices of the rows sorted by expert, largest first (the longest
    tasks start first); slices longer than ``chunk`` are split (inference only: weight gradients
    need whole experts)."""
    tasks, start = [], 0
    for e, c in enumerate(counts):
        step = max(c if chunk is None else chunk, 1)
        for s in range(start, start + c, step):
            tasks.append((e, s, min(s + step, start + c)))
        start += c
    return sorted(tasks, key=lambda t: t[1] - t[2])
