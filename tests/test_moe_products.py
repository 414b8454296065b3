"""Expert products on torch or numpy's OpenBLAS: same numbers, OpenBLAS's thread count held and restored."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ernie_vl.moe.kernels import products
from ernie_vl.moe.kernels.products import TORCH, numpy_openblas, openblas_products, openblas_single_threaded

needs_openblas = pytest.mark.skipif(numpy_openblas() is None, reason="numpy is not linked with a pthreads OpenBLAS")


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
def test_openblas_products_equal_torch_for_every_layout(count_numpy):
    blas = openblas_products()
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(33, 20, generator=gen), torch.randn(12, 20, generator=gen)
    dy, bias = torch.randn(33, 12, generator=gen), torch.randn(12, generator=gen)
    cases = [
        (blas.mm(a, w.t(), torch.empty(33, 12)), a @ w.t()),  # the forward layout
        (blas.addmm(bias, a, w.t(), torch.empty(33, 12)), a @ w.t() + bias),
        (blas.mm(dy.t(), a, torch.empty(12, 20)), dy.t() @ a),  # weight gradient
        (blas.mm(dy, w, torch.empty(33, 20)), dy @ w),  # input gradient
    ]
    assert len(count_numpy) == 4  # all four ran on OpenBLAS
    for ours, ref in cases:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@needs_openblas
def test_other_dtypes_and_strided_outputs_stay_on_torch(count_numpy):
    blas = openblas_products()
    a, w = torch.randn(8, 4), torch.randn(6, 4)
    half = blas.mm(a.bfloat16(), w.t().bfloat16(), torch.empty(8, 6, dtype=torch.bfloat16))
    strided = torch.empty(6, 8).t()  # a non-contiguous output
    blas.mm(a, w.t(), strided)
    TORCH.mm(a, w.t(), torch.empty(8, 6))
    assert count_numpy == []
    torch.testing.assert_close(half.float(), a @ w.t(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(strided, a @ w.t())


@needs_openblas
def test_phase_sets_one_openblas_thread_and_the_last_to_leave_restores_it():
    lib = numpy_openblas()
    before = lib.get_threads()
    lib.set_threads(2)
    try:
        inside: list[int] = []
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

        def first() -> None:
            with openblas_single_threaded(lib):
                first_in.set()
                assert second_in.wait(10)
                inside.append(lib.get_threads())
            first_out.set()

        def second() -> None:
            assert first_in.wait(10)
            with openblas_single_threaded(lib):
                second_in.set()
                assert first_out.wait(10)
                inside.append(lib.get_threads())  # the first caller left: still one thread

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert inside == [1, 1]
        assert lib.get_threads() == 2 and lib.active == 0
        with openblas_single_threaded(lib), openblas_single_threaded(lib):  # re-entrant
            assert lib.get_threads() == 1
        assert lib.get_threads() == 2
    finally:
        lib.set_threads(before)


@needs_openblas
def test_the_driven_library_is_numpys_own_even_with_scipys_copy_loaded():
    # scipy's wheels bundle a second OpenBLAS: the count must change on numpy's, or numpy's products
    # stay multi-threaded; threadpoolctl reads each library's count independently of our handle
    pytest.importorskip("scipy.linalg")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    products.numpy_openblas.cache_clear()  # probe again with both loaded
    lib = numpy_openblas()
    before = lib.get_threads()
    lib.set_threads(2)

    def numpys_count() -> int:
        own = [info for info in threadpoolctl.threadpool_info()
               if info["internal_api"] == "openblas" and "numpy" in info["filepath"]]
        assert len(own) == 1, own
        return own[0]["num_threads"]

    try:
        assert numpys_count() == 2
        with openblas_single_threaded(lib):
            assert numpys_count() == 1
        assert numpys_count() == 2
    finally:
        lib.set_threads(before)


def test_missing_openblas_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(products, "numpy_openblas", lambda: None)
    with pytest.raises(RuntimeError, match="openblas.*OpenBLAS"):
        openblas_products()
