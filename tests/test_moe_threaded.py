"""The expert-parallel ("threads") kernel: same numbers as the one-thread loop, sane worker threads."""
from __future__ import annotations

import threading

import pytest
import torch

import ernie_vl.moe.grouped as grouped
from ernie_vl.moe import threaded
from ernie_vl.moe.threaded import expert_tasks, run_tasks

from _moe_reference import reference_moe, small_layer as _layer


def _run(layer, x: torch.Tensor, kernel: str, threads: int, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (x, then every parameter) of one fwd+bwd with ``kernel`` on ``threads``."""
    monkeypatch.setattr(grouped, "KERNEL", kernel)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        g = torch.linspace(-1.0, 1.0, out.output.numel()).view_as(out.output)
        params = [xg] + list(layer.parameters())
        grads = torch.autograd.grad((out.output * g).sum() + out.aux_loss, params, allow_unused=True)
        return out.output.detach(), [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads)]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("opts", [
    dict(expert_type="mlp", activation="gelu"),
    dict(expert_type="swiglu", activation="silu"),
    dict(expert_type="mlp", activation="quick_gelu", dispatch="capacity", capacity_factor=0.5),
])
def test_threads_kernel_equals_the_one_thread_loop_bitwise(monkeypatch, opts):
    # every expert's arithmetic runs single-threaded in both, so the numbers are identical
    layer = _layer(**opts)
    layer.train()
    x = torch.randn(45, 16)
    out_loop, grads_loop = _run(layer, x, "loop", 1, monkeypatch)
    out_thr, grads_thr = _run(layer, x, "threads", 2, monkeypatch)
    assert torch.equal(out_loop, out_thr)
    for a, b in zip(grads_loop, grads_thr):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_thr, reference_moe(layer, x, keep=None if "dispatch" not in opts else
                                                      _kept(layer, x)), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(grouped, "KERNEL", "threads")
    with torch.no_grad():
        assert torch.equal(layer(x).output, out_thr)  # the inference path (chunks) too


def _kept(layer, x: torch.Tensor) -> torch.Tensor:
    plan = layer.route_tokens(x, None, None).plan
    return (plan.inverse < plan.token_index.shape[0]).view(x.shape[0], -1)


def test_inference_chunks_split_experts_across_workers(monkeypatch):
    monkeypatch.setattr(grouped, "INFERENCE_CHUNK_ROWS", 4)
    monkeypatch.setattr(grouped, "KERNEL", "threads")
    layer = _layer()
    x = torch.randn(60, 16)
    with torch.no_grad():
        fast = layer(x).output
    torch.testing.assert_close(fast, reference_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_expert_tasks_cover_every_row_once_largest_first():
    tasks = expert_tasks([3, 0, 7, 5])
    assert tasks == [(2, 3, 10), (3, 10, 15), (0, 0, 3)]
    chunked = expert_tasks([3, 0, 7, 5], chunk=3)
    assert sorted(chunked) == [(0, 0, 3), (2, 3, 6), (2, 6, 9), (2, 9, 10), (3, 10, 13), (3, 13, 15)]
    assert [t - s for _, s, t in chunked] == sorted((t - s for _, s, t in chunked), reverse=True)
    assert expert_tasks([0, 0]) == []


def test_workers_run_single_threaded_and_new_threads_keep_the_callers_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[tuple[int, bool]] = []
        lock = threading.Lock()

        def task(i: int) -> None:
            with lock:
                seen.append((torch.get_num_threads(), torch.is_grad_enabled()))

        run_tasks(task, [(i,) for i in range(6)])
        assert seen == [(1, False)] * 6  # one intra-op thread each, no autograd recording
        assert torch.get_num_threads() == 2
        counts: list[int] = []
        t = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert counts == [2]  # the workers' set_num_threads(1) did not leak into later threads
    finally:
        torch.set_num_threads(before)


def test_worker_errors_reach_the_caller_after_every_task_finished():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    done: list[int] = []

    def task(i: int) -> None:
        if i == 1:
            raise ValueError("bad expert 1")
        done.append(i)

    try:
        with pytest.raises(ValueError, match="bad expert 1"):
            run_tasks(task, [(i,) for i in range(4)])
        assert sorted(done) == [0, 2, 3]
    finally:
        torch.set_num_threads(before)


def test_inference_mode_reaches_the_workers(monkeypatch):
    monkeypatch.setattr(grouped, "KERNEL", "threads")
    layer = _layer(expert_type="swiglu", activation="silu")
    x = torch.randn(33, 16)
    with torch.inference_mode():
        fast = layer(x).output
    torch.testing.assert_close(fast, reference_moe(layer, x).detach(), atol=1e-5, rtol=1e-5)
    assert threaded.in_worker() is False
