"""Facts about the running machine that kernel choices depend on: CPU, ISA flags, BLAS, threads.

Read when asked (cached per process: a process does not change CPU), never at import, so a
choice made from them follows the machine the code runs on. Imports nothing from the project.

    >>> from ernie_vl import runtime
    >>> runtime.cpu_info().vendor            # "GenuineIntel", "AuthenticAMD", ...
    >>> runtime.has_isa("avx512_vnni")
    >>> runtime.machine_line()               # one line for a benchmark's results file
"""
from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass, field
from typing import Any

#: ISA flags (``/proc/cpuinfo`` names) the toolkit's kernels care about, in report order
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


@dataclass(frozen=True)
class CpuInfo:
    """model: the CPU's model name; vendor: its vendor id ("GenuineIntel", "AuthenticAMD", ...,
    "" when unknown); flags: every ISA flag the OS reports; cores: CPUs this process may run on."""

    model: str
    vendor: str
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1

    @property
    def isa(self) -> tuple[str, ...]:
        """The flags of ``ISA_FLAGS`` this CPU has, in that order."""
        return tuple(f for f in ISA_FLAGS if f in self.flags)

    @property
    def is_amd(self) -> bool:
        return "AMD" in self.vendor or "Hygon" in self.vendor

    @property
    def is_intel(self) -> bool:
        return self.vendor == "GenuineIntel"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cpuinfo(text: str) -> tuple[str, str, frozenset[str]]:
    """(model, vendor, flags) of the first processor in ``/proc/cpuinfo``-formatted ``text``."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("model name", "vendor_id", "flags", "Features") and key not in found:
            found[key] = value.strip()
        if not line.strip() and found:
            break  # the first processor's block is enough
    flags = found.get("flags") or found.get("Features") or ""
    return found.get("model name", ""), found.get("vendor_id", ""), frozenset(flags.split())


@functools.lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """This machine's CPU (from ``/proc/cpuinfo`` on Linux; model and vendor from ``platform`` elsewhere)."""
    model = vendor = ""
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, vendor, flags = parse_cpuinfo(f.read())
    except OSError:
        pass
    return CpuInfo(model or platform.processor() or platform.machine(), vendor, flags, usable_cores())


def has_isa(flag: str) -> bool:
    """True when the CPU reports ``flag`` (``/proc/cpuinfo`` spelling, e.g. ``"avx512_vnni"``)."""
    return flag in cpu_info().flags


@functools.lru_cache(maxsize=None)
def torch_blas() -> str:
    """The BLAS torch's CPU products run on ("mkl", "openblas", "accelerate", ...; "" when unknown)."""
    import torch

    found = re.search(r"BLAS_INFO=([\w-]+)", torch.__config__.show())
    if found:
        return found.group(1).lower()
    return "mkl" if torch.backends.mkl.is_available() else ""


def torch_cpu_capability() -> str:
    """The vector ISA torch's own CPU kernels dispatch to ("AVX512", "AVX2", "DEFAULT", ...)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        return ""


@functools.lru_cache(maxsize=None)
def numpy_blas() -> dict[str, str]:
    """numpy's BLAS: ``name`` ("scipy-openblas", "openblas", "mkl", ...), ``version`` and, for
    OpenBLAS, ``architecture`` (the core its kernels target); empty strings where unknown."""
    info = {"name": "", "version": "", "architecture": ""}
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["name"], info["version"] = str(blas.get("name", "")).lower(), str(blas.get("version", ""))
    except Exception:  # numpy < 1.26 has no mode="dicts"; its layout may change
        return info
    try:
        import threadpoolctl

        np.ones(1) @ np.ones(1)  # load numpy's BLAS so threadpoolctl sees it
        for lib in threadpoolctl.threadpool_info():
            if lib.get("internal_api") == "openblas" and "numpy" in os.path.realpath(lib.get("filepath", "")):
                info["architecture"] = str(lib.get("architecture", ""))
                break
    except ImportError:
        pass
    return info


def thread_counts() -> dict[str, int]:
    """torch's intra-op and inter-op thread counts now, and the usable cores."""
    import torch

    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
            "usable_cores": usable_cores()}


def machine_facts() -> dict[str, Any]:
    """Everything above as plain values (for JSON and for ``ernie-vl env``)."""
    import torch

    cpu = cpu_info()
    return {
        "cpu_model": cpu.model,
        "cpu_vendor": cpu.vendor,
        "isa": {flag: flag in cpu.flags for flag in ISA_FLAGS},
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_blas": torch_blas(),
        "torch_cpu_capability": torch_cpu_capability(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": torch.cuda.is_available(),
        "numpy_blas": numpy_blas(),
        "threads": thread_counts(),
    }


def machine_line() -> str:
    """One line naming the machine, for benchmark results files:
    ``CPU <model> (<vendor>, <cores> cores), ISA <flags>; torch <version> on <BLAS>, <n> threads``."""
    import torch

    cpu = cpu_info()
    isa = " ".join(cpu.isa) or "none of " + ", ".join(ISA_FLAGS)
    return (f"CPU {cpu.model} ({cpu.vendor or 'unknown vendor'}, {cpu.cores} cores), ISA {isa}; "
            f"torch {torch.__version__} on {torch_blas() or 'unknown BLAS'}, {torch.get_num_threads()} threads")
