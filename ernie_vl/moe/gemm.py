"""Matrix products of the expert kernels: torch's BLAS, or numpy's OpenBLAS where faster.

The expert kernels (:mod:`ernie_vl.moe.threaded`) run every product single-threaded: each
worker thread takes whole experts. On AMD Zen CPUs the MKL that torch's x86 wheels link
takes a generic code path, while the OpenBLAS that numpy's wheels bundle has kernels tuned
for the core (measured on the 2-core EPYC here, one thread, the shapes of bench/moe.py:
torch.mm 45-67 GFLOP/s, numpy's OpenBLAS 64-78 GFLOP/s; with both cores busy ~100 vs ~130
GFLOP/s together). So:

- ``"auto"`` (default): numpy's OpenBLAS when torch's BLAS is MKL and the CPU is AMD (or
  Hygon), torch's BLAS everywhere else (MKL on Intel, whatever torch links on ARM);
- ``"torch"`` / ``"openblas"``: forced (tests, benchmarks); the environment variable
  ``ERNIE_VL_MOE_GEMM`` sets the default.

OpenBLAS is used only for contiguous-output float32/float64 CPU products on a thread that
runs expert tasks (:func:`openblas_products`) inside :func:`single_threaded_blas` (a layer
call's expert phase), which sets OpenBLAS to one thread per call for the duration (a
process-wide setting, restored on exit: a numpy product run by another thread meanwhile also
runs single-threaded). The backend is decided once per scope, not per product. Every other product (CUDA, bf16, the multi-threaded loop) stays
on torch. Both backends give the same result up to float rounding; within one process the
backend is fixed, so the expert-parallel kernel still equals the one-thread loop bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

GEMM = os.environ.get("ERNIE_VL_MOE_GEMM", "auto")
GEMMS = ("auto", "torch", "openblas")

_LOCK = threading.Lock()
_OPENBLAS: "_OpenBLAS | None | bool" = False  # False: not probed yet; None: unavailable
_ACTIVE = 0  # callers inside single_threaded_blas (the OpenBLAS thread count is process-wide)
_SAVED_THREADS = 0
_LOCAL = threading.local()  # .on: this thread's mm/addmm go to OpenBLAS


class _OpenBLAS:
    """numpy's OpenBLAS (pthreads build): its process-wide thread-count setter and getter.

    Called through ctypes directly: threadpoolctl (used only to find the library) lets just
    one "controlling" thread change the count, and our callers may be any thread.
    """

    def __init__(self, controller, set_fn, get_fn) -> None:
        self.version = controller.version
        self.architecture = controller.architecture
        self._set, self._get = set_fn, get_fn

    def get_threads(self) -> int:
        return int(self._get())

    def set_threads(self, n: int) -> None:
        self._set(int(n))


def _symbol(dynlib, name: str):
    """``name`` in ``dynlib`` under any of OpenBLAS's prefixes / suffixes (scipy-openblas
    builds export e.g. ``scipy_openblas_set_num_threads64_``), or None."""
    for prefix in ("scipy_", ""):
        for suffix in ("64_", "", "_64"):
            fn = getattr(dynlib, f"{prefix}{name}{suffix}", None)
            if fn is not None:
                return fn
    return None


def openblas() -> "_OpenBLAS | None":
    """numpy's OpenBLAS, or None when numpy links another BLAS or threadpoolctl is missing."""
    global _OPENBLAS
    if _OPENBLAS is False:
        with _LOCK:
            if _OPENBLAS is False:
                _OPENBLAS = _probe_openblas()
    return _OPENBLAS  # type: ignore[return-value]


def _probe_openblas() -> "_OpenBLAS | None":
    try:
        import numpy as np
        import threadpoolctl
    except ImportError:
        return None
    if "openblas" not in _numpy_blas_name(np):
        return None
    np.ones(1) @ np.ones(1)  # make sure numpy's BLAS is loaded
    openblases = [lib for lib in threadpoolctl.ThreadpoolController().lib_controllers
                  if lib.internal_api == "openblas"]
    # numpy's own copy (wheels: numpy.libs/ or numpy/.dylibs/), not e.g. scipy's (scipy.libs/)
    numpy_dir = os.path.realpath(os.path.dirname(np.__file__))
    own = [lib for lib in openblases
           if os.path.realpath(lib.filepath).startswith((numpy_dir + os.sep, numpy_dir + ".libs" + os.sep))]
    if not own and len(openblases) == 1:
        own = openblases  # a system OpenBLAS shared by every package (conda, distributions)
    for lib in own[:1]:
        if getattr(lib, "threading_layer", "pthreads") != "pthreads":
            return None  # an OpenMP build: its count is per OpenMP thread, not ours to manage
        set_fn = _symbol(lib.dynlib, "openblas_set_num_threads")
        get_fn = _symbol(lib.dynlib, "openblas_get_num_threads")
        if set_fn is None or get_fn is None:
            return None
        set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
        get_fn.argtypes, get_fn.restype = [], ctypes.c_int
        return _OpenBLAS(lib, set_fn, get_fn)
    return None


def _numpy_blas_name(np) -> str:
    """numpy's build-time BLAS name ("scipy-openblas", "openblas", "mkl", ...), "" if unknown."""
    try:
        return str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]).lower()
    except Exception:  # numpy < 1.26 has no mode="dicts"; its layout may change
        return ""


@contextmanager
def single_threaded_blas() -> Iterator[bool]:
    """Route this thread's expert products to OpenBLAS with one thread per call when the
    backend is "openblas"; yields whether it is (pass that to :func:`openblas_products` on
    the worker threads that run this scope's tasks).

    Re-entrant and safe to enter from several threads: the first to enter sets the count, the
    last to leave restores it.
    """
    global _ACTIVE, _SAVED_THREADS
    lib = openblas() if backend() == "openblas" else None
    if lib is None:
        yield False
        return
    with _LOCK:
        if _ACTIVE == 0:
            _SAVED_THREADS = lib.get_threads()
            if _SAVED_THREADS != 1:
                lib.set_threads(1)
        _ACTIVE += 1
    try:
        with openblas_products(True):
            yield True
    finally:
        with _LOCK:
            _ACTIVE -= 1
            if _ACTIVE == 0 and _SAVED_THREADS != 1:
                lib.set_threads(_SAVED_THREADS)


@contextmanager
def openblas_products(on: bool) -> Iterator[None]:
    """Send this thread's :func:`mm` / :func:`addmm` to OpenBLAS (``on``) or torch, restored after."""
    previous = getattr(_LOCAL, "on", False)
    _LOCAL.on = on
    try:
        yield
    finally:
        _LOCAL.on = previous


def backend() -> str:
    """"torch" or "openblas": the backend of this process's expert products (see ``GEMM``)."""
    if GEMM not in GEMMS:
        raise ValueError(f"ernie_vl.moe.gemm.GEMM must be one of {GEMMS}, got {GEMM!r}")
    if GEMM == "torch":
        return "torch"
    if openblas() is None:
        if GEMM == "openblas":
            raise RuntimeError("GEMM='openblas' needs numpy built with OpenBLAS and the threadpoolctl package")
        return "torch"
    if GEMM == "openblas":
        return "openblas"
    return _auto_choice()


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor string ("AuthenticAMD", "GenuineIntel", ...; "" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.lru_cache(maxsize=None)
def _auto_choice() -> str:
    """OpenBLAS when torch's BLAS is MKL on an AMD / Hygon CPU (MKL's generic path), else torch."""
    vendor = cpu_vendor()
    mkl_on_amd = torch.backends.mkl.is_available() and ("AMD" in vendor or "Hygon" in vendor)
    return "openblas" if mkl_on_amd else "torch"


def _use_openblas(out: torch.Tensor, *operands: torch.Tensor) -> bool:
    return (getattr(_LOCAL, "on", False) and out.device.type == "cpu"
            and out.dtype in (torch.float32, torch.float64) and out.is_contiguous()
            and all(t.dtype == out.dtype and t.device.type == "cpu" for t in operands))


def _np(t: torch.Tensor):
    return t.detach().numpy()


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` for 2-D ``a`` (n, k), ``b`` (k, m) (any strides), ``out`` (n, m)."""
    if _use_openblas(out, a, b):
        import numpy as np

        np.matmul(_np(a), _np(b), out=_np(out))
        return out
    return torch.mm(a, b, out=out)


def addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b + bias`` (bias (m,) broadcast over rows; None: no bias)."""
    if bias is None:
        return mm(a, b, out)
    if _use_openblas(out, a, b, bias):
        mm(a, b, out)
        return out.add_(bias)
    return torch.addmm(bias, a, b, out=out)
