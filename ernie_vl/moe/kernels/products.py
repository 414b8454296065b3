"""The matrix products of the expert kernels: torch's BLAS, or numpy's OpenBLAS.

Every expert product runs single-threaded (each worker thread takes whole experts). On AMD Zen
CPUs the MKL of torch's x86 wheels takes a generic code path while the OpenBLAS bundled with
numpy has kernels for the core (measured on a 2-core EPYC, one thread, the shapes of
bench/moe.py: torch.mm 45-67 GFLOP/s, OpenBLAS 64-78 GFLOP/s); on Intel CPUs MKL is the faster
one. Which to use is the caller's explicit choice (:class:`Products`); ``kernels.choose`` makes
it from the machine.

OpenBLAS's thread count is process-wide: :func:`openblas_single_threaded` holds it at one for
the duration of an expert phase (re-entrant across threads: the first to enter sets it, the last
to leave restores it). Only float32/float64 CPU products with a contiguous output go to
OpenBLAS; any other product of an OpenBLAS phase runs on torch.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch


class Products:
    """``mm`` / ``addmm`` into preallocated outputs on torch's BLAS; ``phase()`` is the context an
    expert phase runs in (nothing for torch)."""

    name = "torch"

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = a @ b`` for 2-D ``a`` (n, k), ``b`` (k, m) (any strides), ``out`` (n, m)."""
        return torch.mm(a, b, out=out)

    def addmm(self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = a @ b + bias`` (bias (m,) broadcast over rows; None: no bias)."""
        if bias is None:
            return self.mm(a, b, out)
        return torch.addmm(bias, a, b, out=out)

    def phase(self) -> ContextManager[object]:
        return nullcontext()


class OpenBLASProducts(Products):
    """The same products on numpy's OpenBLAS (see the module docstring)."""

    name = "openblas"

    def __init__(self, lib: "_OpenBLAS") -> None:
        self.lib = lib

    @staticmethod
    def _fits(out: torch.Tensor, *operands: torch.Tensor) -> bool:
        return (out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64) and out.is_contiguous()
                and all(t.dtype == out.dtype and t.device.type == "cpu" for t in operands))

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self._fits(out, a, b):
            return torch.mm(a, b, out=out)
        import numpy as np

        np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.detach().numpy())
        return out

    def addmm(self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if bias is None or not self._fits(out, a, b, bias):
            return super().addmm(bias, a, b, out)
        return self.mm(a, b, out).add_(bias)

    def phase(self) -> ContextManager[object]:
        return openblas_single_threaded(self.lib)


TORCH = Products()


class _OpenBLAS:
    """numpy's OpenBLAS (pthreads build): its process-wide thread-count setter and getter, called
    through ctypes (threadpoolctl, used to find the library, lets only one thread change it)."""

    def __init__(self, version: str, architecture: str, set_fn, get_fn) -> None:
        self.version, self.architecture = version, architecture
        self._set, self._get = set_fn, get_fn
        self.lock = threading.Lock()
        self.active = 0  # callers inside openblas_single_threaded
        self.saved = 0

    def get_threads(self) -> int:
        return int(self._get())

    def set_threads(self, n: int) -> None:
        self._set(int(n))


def _symbol(dynlib, name: str):
    """``name`` under any of OpenBLAS's prefixes / suffixes (e.g. ``scipy_openblas_set_num_threads64_``)."""
    for prefix in ("scipy_", ""):
        for suffix in ("64_", "", "_64"):
            fn = getattr(dynlib, f"{prefix}{name}{suffix}", None)
            if fn is not None:
                return fn
    return None


@functools.lru_cache(maxsize=None)
def numpy_openblas() -> "_OpenBLAS | None":
    """numpy's own OpenBLAS, or None (numpy links another BLAS, an OpenMP build, no threadpoolctl)."""
    try:
        import numpy as np
        import threadpoolctl
    except ImportError:
        return None
    np.ones(1) @ np.ones(1)  # make sure numpy's BLAS is loaded
    libs = [lib for lib in threadpoolctl.ThreadpoolController().lib_controllers if lib.internal_api == "openblas"]
    # numpy's own copy (wheels: numpy.libs/ or numpy/.dylibs/), not e.g. scipy's (scipy.libs/)
    numpy_dir = os.path.realpath(os.path.dirname(np.__file__))
    own = [lib for lib in libs
           if os.path.realpath(lib.filepath).startswith((numpy_dir + os.sep, numpy_dir + ".libs" + os.sep))]
    if not own and len(libs) == 1:
        own = libs  # a system OpenBLAS shared by every package (conda, distributions)
    if not own or getattr(own[0], "threading_layer", "pthreads") != "pthreads":
        return None  # an OpenMP build: its count is per OpenMP thread, not ours to manage
    set_fn = _symbol(own[0].dynlib, "openblas_set_num_threads")
    get_fn = _symbol(own[0].dynlib, "openblas_get_num_threads")
    if set_fn is None or get_fn is None:
        return None
    set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
    get_fn.argtypes, get_fn.restype = [], ctypes.c_int
    return _OpenBLAS(str(own[0].version), str(own[0].architecture), set_fn, get_fn)


def openblas_products() -> OpenBLASProducts:
    """Products on numpy's OpenBLAS; RuntimeError where there is none to drive."""
    lib = numpy_openblas()
    if lib is None:
        raise RuntimeError("the 'openblas' MoE backend needs numpy built with a pthreads OpenBLAS and the "
                           "threadpoolctl package")
    return OpenBLASProducts(lib)


@contextmanager
def openblas_single_threaded(lib: _OpenBLAS) -> Iterator[None]:
    """Hold ``lib`` at one thread per call while any caller is inside (restored by the last to leave)."""
    with lib.lock:
        if lib.active == 0:
            lib.saved = lib.get_threads()
            if lib.saved != 1:
                lib.set_threads(1)
        lib.active += 1
    try:
        yield
    finally:
        with lib.lock:
            lib.active -= 1
            if lib.active == 0 and lib.saved != 1:
                lib.set_threads(lib.saved)
