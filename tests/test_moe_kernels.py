"""Every expert kernel against the layer's reference dispatch: output and every gradient; the pool."""
from __future__ import annotations

import threading

import pytest
import torch

from ernie_vl.modality import IMAGE, TEXT
from ernie_vl.moe.kernels import fused, pool
from ernie_vl.moe.kernels.pool import expert_tasks, run_tasks
from ernie_vl.moe.kernels.products import numpy_openblas

from _moe_helpers import reference_output, small_layer as _layer

KERNELS = ["loop", "threads"] + (["openblas"] if numpy_openblas() is not None else [])


def _run(layer, x: torch.Tensor, backend: str, threads: int, ids=None, mask=None):
    """Output and gradients (x, then every parameter) of one fwd+bwd on ``backend`` with ``threads``."""
    layer.backend = backend
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xg = x.clone().requires_grad_(True)
        out = layer(xg, ids, mask)
        g = torch.linspace(-1.0, 1.0, out.output.numel()).view_as(out.output)
        params = [xg] + list(layer.parameters())
        grads = torch.autograd.grad((out.output * g).sum() + out.aux_loss, params, allow_unused=True)
        return out.output.detach(), [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads)]
    finally:
        torch.set_num_threads(before)
        layer.backend = "auto"


CASES = [
    dict(expert_type="mlp", activation="gelu"),
    dict(expert_type="mlp", activation="gelu_tanh", bias=False),
    dict(expert_type="mlp", activation="quick_gelu", num_shared_experts=1),
    dict(expert_type="swiglu", activation="silu"),
    dict(expert_type="mlp", activation="gelu", dispatch="capacity", capacity_factor=0.5),
    dict(expert_type="swiglu", activation="silu", routing="isolated"),
    dict(expert_type="swiglu", activation="silu", routing="groups", group_experts=(4, 3), group_hidden=(24, 8),
         num_shared_experts=1, score_bias=True, norm_min=0.5),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_kernel_matches_the_reference_output_and_every_gradient(backend, threads, opts):
    torch.manual_seed(0)
    layer = _layer(**opts)
    layer.train()
    x = torch.randn(37, 16)
    ids = torch.tensor([TEXT, IMAGE] * 18 + [TEXT]) if opts.get("routing") in ("isolated", "groups") else None
    mask = torch.ones(37, dtype=torch.bool)
    mask[[3, 20]] = False  # padding: not routed, output 0, no gradient
    ref_out, ref_grads = _run(layer, x, "reference", threads, ids, mask)
    out, grads = _run(layer, x, backend, threads, ids, mask)
    if opts.get("dispatch") == "capacity":
        assert int(layer(x, ids, mask).stats.dropped_tokens) > 0  # the dropped-row sentinel is exercised
    assert torch.equal(out[[3, 20]], torch.zeros(2, 16))
    if opts.get("routing") == "groups":  # the backend reaches every group's sub-layer
        layer.backend = backend
        assert [g.backend for g in layer.groups] == [backend] * 2
        layer.backend = "auto"
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads) == 1 + len(list(layer.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(bool(g.abs().sum() > 0) for g in grads[1:])  # the parameters did get gradients
    layer.backend = backend
    with torch.no_grad():  # the inference path (chunked, scratch outputs)
        torch.testing.assert_close(layer(x, ids, mask).output, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", CASES[:5], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_threads_kernel_equals_the_one_thread_loop_bitwise(opts):
    # every expert's arithmetic runs single-threaded in both, so the numbers are identical
    layer = _layer(**opts)
    layer.train()
    x = torch.randn(45, 16)
    out_loop, grads_loop = _run(layer, x, "loop", 1)
    out_thr, grads_thr = _run(layer, x, "threads", 2)
    assert torch.equal(out_loop, out_thr)
    for a, b in zip(grads_loop, grads_thr):
        assert torch.equal(a, b)


def test_idle_experts_get_exact_zero_gradients():
    layer = _layer()
    with torch.no_grad():
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    x = torch.randn(20, 16)
    x[:, 0] = x[:, 0].abs() + 1.0
    for backend in KERNELS:
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        assert int(out.stats.tokens_per_expert[3]) == 0
        out.output.square().sum().backward()
        for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2):
            assert torch.equal(p.grad[3], torch.zeros_like(p.grad[3]))
            assert p.grad[:3].abs().sum() > 0


def test_inference_chunks_split_experts_across_workers(monkeypatch):
    monkeypatch.setattr(fused, "INFERENCE_CHUNK_ROWS", 4)
    layer = _layer(backend="threads")
    x = torch.randn(60, 16)
    with torch.no_grad():
        fast = layer(x).output
    torch.testing.assert_close(fast, reference_output(layer, x), atol=1e-5, rtol=1e-5)


def test_bfloat16_experts_on_the_fused_kernels():
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(30, 16, dtype=torch.bfloat16)
    ref = reference_output(layer, x)
    for backend in ("loop", "threads"):
        layer.backend = backend
        with torch.no_grad():
            torch.testing.assert_close(layer(x).output, ref, atol=2e-2, rtol=2e-2)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'fast'.*auto, reference, loop, threads, openblas"):
        _layer(backend="fast")
    layer = _layer()
    with pytest.raises(ValueError, match="valid"):
        layer.backend = "padded"


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
        seen: list[tuple[int, bool, bool]] = []
        lock = threading.Lock()

        def task(i: int) -> None:
            with lock:
                seen.append((torch.get_num_threads(), torch.is_grad_enabled(), pool.in_worker()))

        run_tasks(task, [(i,) for i in range(6)])
        assert seen == [(1, False, True)] * 6  # on the workers, one intra-op thread each, no autograd
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


def test_inference_mode_reaches_the_workers():
    layer = _layer(expert_type="swiglu", activation="silu", backend="threads")
    x = torch.randn(33, 16)
    with torch.inference_mode():
        fast = layer(x).output
    torch.testing.assert_close(fast, reference_output(layer, x).detach(), atol=1e-5, rtol=1e-5)
    assert pool.in_worker() is False



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_runs_the_reference_and_every_kernel_agrees():
    layer = _layer().cuda()
    x = torch.randn(64, 16, device="cuda")
    plan = layer.route_tokens(x, None, None).plan
    assert layer.expert_backend(x, plan.counts) == "reference"
    ref_out, ref_grads = _run(layer, x, "reference", torch.get_num_threads())
    for backend in ("loop", "threads"):
        out, grads = _run(layer, x, backend, torch.get_num_threads())
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_sums_each_tokens_rows_in_slot_order(top_k, weighted):
    """combine == the (N, k, D) gather and weighted sum, dropped assignments (the zero row) included."""
    gen = torch.Generator().manual_seed(top_k)
    n, d, m = 7, 5, 7 * top_k - 3  # 3 assignments dropped: they point at the zero row M
    rows = torch.cat([torch.randn(m, d, generator=gen), torch.zeros(1, d)])
    inverse = torch.cat([torch.randperm(m, generator=gen), torch.full((3,), m)])[torch.randperm(n * top_k, generator=gen)]
    weights = torch.rand(n, top_k, generator=gen, dtype=torch.float64)
    per_token = rows[inverse].view(n, top_k, d)
    expected = (per_token * weights.float().unsqueeze(-1)).sum(1) if weighted else per_token.sum(1)
    got = fused.combine(rows, inverse, weights if weighted else None, top_k)
    assert got.dtype == rows.dtype and got.shape == (n, d)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
