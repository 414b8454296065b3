"""Which expert kernel runs a call: ``backend="auto"`` decided per call from its arguments and the machine.

Backends (the ``backend=`` of :class:`ernie_vl.moe.MoEFeedForward`):

- ``"reference"``: the layer's readable dispatch (sort by expert, one autograd product per expert,
  combine; ``ernie_vl/moe/layer.py``), the spec every kernel is tested against;
- ``"loop"``: :mod:`.fused` on the calling thread, one expert after the other, products on torch
  with its intra-op threads;
- ``"threads"``: :mod:`.fused` with one task per expert on single-threaded workers (:mod:`.pool`);
- ``"openblas"``: as ``"threads"``, every product on numpy's OpenBLAS (:mod:`.products`).

``"auto"``: the reference off the CPU (one large product per expert is what a GPU wants); on the
CPU with several intra-op threads and several busy experts the expert-parallel kernel, else the
loop; its products on numpy's OpenBLAS only where torch's BLAS is MKL on a CPU that is not
Intel's (MKL's generic path there) and a one-time micro-probe measured OpenBLAS faster.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ...runtime import cpu_info, torch_blas
from .pool import single_threaded
from .products import numpy_openblas, openblas_single_threaded

BACKENDS = ("auto", "reference", "loop", "threads", "openblas")
#: OpenBLAS must beat torch's BLAS by this much in the probe to be chosen
OPENBLAS_MIN_SPEEDUP = 1.1
PROBE_SHAPE = (256, 512, 1024)  # (rows, d_model, hidden) of one expert product in the probe


@dataclass(frozen=True)
class BackendChoice:
    """The backend a call runs on, and why."""

    name: str
    reason: str


def check_backend(backend: str) -> str:
    """``backend`` if it is one of ``BACKENDS``; ValueError naming the valid ones otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


def decide(device_type: str, dtype: torch.dtype, counts: Sequence[int], threads: int,
           openblas_faster: bool) -> BackendChoice:
    """The ``"auto"`` rule as a pure function of the call and the machine's facts."""
    if device_type != "cpu":
        return BackendChoice("reference", f"on {device_type}: one product per expert")
    busy = sum(1 for c in counts if c > 0)
    blas = openblas_faster and dtype in (torch.float32, torch.float64)
    if threads > 1 and busy > 1:
        if blas:
            return BackendChoice("openblas", f"{threads} threads, {busy} busy experts; numpy's OpenBLAS beats "
                                             "torch's MKL on this CPU")
        return BackendChoice("threads", f"{threads} threads, {busy} busy experts: one expert per worker")
    if blas and busy:
        return BackendChoice("openblas", "one thread or one busy expert; numpy's OpenBLAS beats torch's MKL "
                                         "on this CPU")
    return BackendChoice("loop", f"{threads} thread(s), {busy} busy expert(s): experts one after the other")


@functools.lru_cache(maxsize=None)
def openblas_faster() -> bool:
    """True when expert products should run on numpy's OpenBLAS on this machine: torch's BLAS is
    MKL, the CPU is not Intel's, numpy has a pthreads OpenBLAS, and the probe agrees."""
    if torch_blas() != "mkl" or cpu_info().is_intel or numpy_openblas() is None:
        return False
    return probe_openblas_speedup() >= OPENBLAS_MIN_SPEEDUP


@functools.lru_cache(maxsize=None)
def probe_openblas_speedup(repeats: int = 5) -> float:
    """torch.mm time / numpy's OpenBLAS time for one single-threaded expert-sized product (best of
    ``repeats`` each, interleaved, after a warm-up); 0.0 where numpy has no OpenBLAS to drive."""
    lib = numpy_openblas()
    if lib is None:
        return 0.0
    import numpy as np

    rows, d, hidden = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, d, generator=gen), torch.randn(d, hidden, generator=gen)
    out = torch.empty(rows, hidden)
    na, nb, nout = a.numpy(), b.numpy(), out.numpy()
    best = {"torch": float("inf"), "openblas": float("inf")}
    with single_threaded(), openblas_single_threaded(lib):
        for i in range(repeats + 1):
            for name in ("torch", "openblas") if i % 2 else ("openblas", "torch"):
                t0 = time.perf_counter()
                if name == "torch":
                    torch.mm(a, b, out=out)
                else:
                    np.matmul(na, nb, out=nout)
                if i:
                    best[name] = min(best[name], time.perf_counter() - t0)
    return best["torch"] / best["openblas"]


def choose_backend(backend: str, x: torch.Tensor, counts: Sequence[int]) -> BackendChoice:
    """The backend of one call: ``backend`` itself unless it is ``"auto"`` (see the module docstring)."""
    check_backend(backend)
    if backend != "auto":
        return BackendChoice(backend, "asked for")
    faster = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and openblas_faster()
    return decide(x.device.type, x.dtype, counts, torch.get_num_threads(), faster)
