"""Expert products on torch or numpy's OpenBLAS (ernie_vl/moe/gemm.py): same numbers, thread count restored."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

import ernie_vl.moe.grouped as grouped
from ernie_vl.moe import gemm

from _moe_reference import small_layer

needs_openblas = pytest.mark.skipif(gemm.openblas() is None, reason="numpy is not linked with OpenBLAS")


@pytest.fixture
def count_numpy(monkeypatch):
    calls = []
    original = np.matmul

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "matmul", counting)
    return calls


@needs_openblas
def test_openblas_products_equal_torch_for_every_layout(monkeypatch, count_numpy):
    monkeypatch.setattr(gemm, "GEMM", "openblas")
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(33, 20, generator=gen), torch.randn(12, 20, generator=gen)
    dy, bias = torch.randn(33, 12, generator=gen), torch.randn(12, generator=gen)
    with gemm.single_threaded_blas():
        cases = [
            (gemm.mm(a, w.t(), torch.empty(33, 12)), a @ w.t()),  # the forward layout
            (gemm.addmm(bias, a, w.t(), torch.empty(33, 12)), a @ w.t() + bias),
            (gemm.mm(dy.t(), a, torch.empty(12, 20)), dy.t() @ a),  # weight gradient
            (gemm.mm(dy, w, torch.empty(33, 20)), dy @ w),  # input gradient
        ]
    assert len(count_numpy) == 4  # all four ran on OpenBLAS
    for ours, ref in cases:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@needs_openblas
def test_products_stay_on_torch_outside_the_scope_and_for_other_dtypes(monkeypatch, count_numpy):
    monkeypatch.setattr(gemm, "GEMM", "openblas")
    a, w = torch.randn(8, 4), torch.randn(6, 4)
    torch.testing.assert_close(gemm.mm(a, w.t(), torch.empty(8, 6)), a @ w.t())  # no scope: torch
    with gemm.single_threaded_blas():
        half = gemm.mm(a.bfloat16(), w.t().bfloat16(), torch.empty(8, 6, dtype=torch.bfloat16))
        strided = torch.empty(6, 8).t()  # a non-contiguous output
        gemm.mm(a, w.t(), strided)
    assert count_numpy == []
    torch.testing.assert_close(half.float(), a @ w.t(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(strided, a @ w.t())


@needs_openblas
def test_only_threads_running_expert_tasks_use_openblas(monkeypatch, count_numpy):
    # another thread's products stay on torch while a scope is open elsewhere; workers opt in
    monkeypatch.setattr(gemm, "GEMM", "openblas")
    a, w = torch.randn(8, 4), torch.randn(6, 4)
    entered, release = threading.Event(), threading.Event()

    def hold_scope() -> None:
        with gemm.single_threaded_blas() as on:
            assert on is True
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold_scope)
    holder.start()
    try:
        assert entered.wait(10)
        gemm.mm(a, w.t(), torch.empty(8, 6))  # this thread is outside any scope
        assert count_numpy == []
        with gemm.openblas_products(True):  # what a worker does for the scope's tasks
            out = gemm.mm(a, w.t(), torch.empty(8, 6))
        assert len(count_numpy) == 1
        torch.testing.assert_close(out, a @ w.t())
    finally:
        release.set()
        holder.join()


@needs_openblas
def test_scope_sets_one_openblas_thread_and_restores_the_count(monkeypatch):
    monkeypatch.setattr(gemm, "GEMM", "openblas")
    lib = gemm.openblas()
    before = lib.get_threads()
    lib.set_threads(2)
    try:
        inside: list[int] = []
        barrier = threading.Barrier(2)

        def enter() -> None:  # two callers overlap: the last to leave restores
            with gemm.single_threaded_blas():
                barrier.wait()
                inside.append(lib.get_threads())
                barrier.wait()

        threads = [threading.Thread(target=enter) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert inside == [1, 1]
        assert lib.get_threads() == 2
        with gemm.single_threaded_blas(), gemm.single_threaded_blas():  # re-entrant
            assert lib.get_threads() == 1
        assert lib.get_threads() == 2
    finally:
        lib.set_threads(before)


@needs_openblas
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 1 BLAS thread from 2")
def test_scope_makes_numpys_own_products_single_threaded(monkeypatch):
    # scipy's wheels bundle a second OpenBLAS: the probe must take numpy's, or its products stay multi-threaded
    pytest.importorskip("scipy.linalg")
    monkeypatch.setattr(gemm, "_OPENBLAS", False)  # probe again with both loaded
    monkeypatch.setattr(gemm, "GEMM", "openblas")
    lib = gemm.openblas()
    before = lib.get_threads()
    lib.set_threads(2)
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)

    def other_threads_cpu() -> float:  # CPU seconds of this process outside the calling thread
        p0, t0 = time.process_time(), time.thread_time()
        for _ in range(6):
            a @ a
        return (time.process_time() - p0) - (time.thread_time() - t0), time.thread_time() - t0

    try:
        other, own = other_threads_cpu()
        assert other > 0.3 * own  # unscoped: OpenBLAS's own threads share the work
        time.sleep(0.5)  # its idle threads spin for a while after a call before they sleep
        with gemm.single_threaded_blas():
            other, own = other_threads_cpu()
        assert other < 0.1 * own
    finally:
        lib.set_threads(before)


@needs_openblas
@pytest.mark.parametrize("kernel,threads", [("loop", 1), ("threads", 2)])
@pytest.mark.parametrize("opts", [dict(expert_type="mlp", activation="gelu"),
                                  dict(expert_type="swiglu", activation="silu")])
def test_layer_gives_the_same_output_and_gradients_on_both_backends(monkeypatch, count_numpy, kernel, threads, opts):
    monkeypatch.setattr(grouped, "KERNEL", kernel)
    layer = small_layer(**opts)
    layer.train()
    x = torch.randn(45, 16)
    results = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in ("torch", "openblas"):
            monkeypatch.setattr(gemm, "GEMM", name)
            xg = x.clone().requires_grad_(True)
            out = layer(xg)
            params = [xg] + list(layer.parameters())
            g = torch.linspace(-1.0, 1.0, out.output.numel()).view_as(out.output)
            grads = torch.autograd.grad((out.output * g).sum() + out.aux_loss, params, allow_unused=True)
            results[name] = [out.output] + [d for d in grads if d is not None]
            if name == "torch":
                assert count_numpy == []
    finally:
        torch.set_num_threads(before)
    assert len(count_numpy) > 0
    for a, b in zip(results["torch"], results["openblas"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vendor,mkl,expected", [
    ("AuthenticAMD", True, "openblas"),  # MKL's generic path on AMD
    ("HygonGenuine", True, "openblas"),
    ("GenuineIntel", True, "torch"),
    ("AuthenticAMD", False, "torch"),  # torch not on MKL: nothing to fix
    ("", True, "torch"),
])
def test_auto_picks_openblas_only_for_mkl_on_amd(monkeypatch, vendor, mkl, expected):
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    monkeypatch.setattr(gemm, "_OPENBLAS", object())  # numpy with OpenBLAS
    monkeypatch.setattr(gemm, "GEMM", "auto")
    gemm._auto_choice.cache_clear()
    try:
        assert gemm.backend() == expected
    finally:
        gemm._auto_choice.cache_clear()


def test_cpu_vendor_reads_the_machine():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    vendor = gemm.cpu_vendor()
    with open("/proc/cpuinfo") as f:
        text = f.read()
    if "vendor_id" in text:
        assert vendor and vendor in text


def test_unknown_or_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gemm, "GEMM", "mkl")
    with pytest.raises(ValueError, match=r"'auto', 'torch', 'openblas'.*'mkl'"):
        gemm.backend()
    monkeypatch.setattr(gemm, "_OPENBLAS", None)  # numpy without OpenBLAS
    monkeypatch.setattr(gemm, "GEMM", "openblas")
    with pytest.raises(RuntimeError, match="OpenBLAS"):
        gemm.backend()
    monkeypatch.setattr(gemm, "GEMM", "auto")
    assert gemm.backend() == "torch"
