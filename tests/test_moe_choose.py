"""backend="auto": the rule per call, the machine facts it reads, and the one-time OpenBLAS probe."""
from __future__ import annotations

import pytest
import torch

from ernie_vl import runtime
from ernie_vl.moe.kernels import choose
from ernie_vl.moe.kernels.choose import choose_backend, decide


@pytest.mark.parametrize("device,dtype,counts,threads,faster,expected", [
    ("cuda", torch.float32, [5, 5], 2, False, "reference"),
    ("cuda", torch.float32, [5, 5], 2, True, "reference"),
    ("cpu", torch.float32, [5, 5], 2, False, "threads"),
    ("cpu", torch.float32, [5, 5], 2, True, "openblas"),
    ("cpu", torch.bfloat16, [5, 5], 2, True, "threads"),  # OpenBLAS has no bf16 product
    ("cpu", torch.float32, [10, 0], 2, False, "loop"),  # one busy expert: nothing to share out
    ("cpu", torch.float32, [5, 5], 1, False, "loop"),
    ("cpu", torch.float32, [5, 5], 1, True, "openblas"),
    ("cpu", torch.float32, [0, 0], 2, True, "loop"),  # nothing routed
])
def test_auto_rule(device, dtype, counts, threads, faster, expected):
    choice = decide(device, dtype, counts, threads, faster)
    assert choice.name == expected and choice.reason


def test_explicit_backends_are_kept_and_unknown_names_rejected():
    x = torch.zeros(4, 8)
    for name in ("reference", "loop", "threads", "openblas"):
        assert choose_backend(name, x, [2, 2]).name == name
    with pytest.raises(ValueError, match=r"'mkl'.*valid: auto, reference, loop, threads, openblas"):
        choose_backend("mkl", x, [2, 2])


def test_auto_follows_the_thread_count_of_each_call(monkeypatch):
    monkeypatch.setattr(choose, "openblas_faster", lambda: False)
    before = torch.get_num_threads()
    x = torch.zeros(4, 8)
    try:
        torch.set_num_threads(2)
        assert choose_backend("auto", x, [2, 2]).name == "threads"
        torch.set_num_threads(1)
        assert choose_backend("auto", x, [2, 2]).name == "loop"
    finally:
        torch.set_num_threads(before)


def _fake_cpu(vendor: str) -> runtime.CpuInfo:
    return runtime.CpuInfo("test CPU", vendor, frozenset({"avx2"}), 2)


@pytest.mark.parametrize("vendor,blas,speedup,expected", [
    ("AuthenticAMD", "mkl", 1.4, True),  # MKL's generic path on AMD, and the probe agrees
    ("AuthenticAMD", "mkl", 1.02, False),  # the flag says maybe, the probe says no
    ("HygonGenuine", "mkl", 1.4, True),
    ("GenuineIntel", "mkl", None, False),  # MKL's home: no probe needed
    ("AuthenticAMD", "openblas", None, False),  # torch not on MKL: nothing to fix
])
def test_openblas_only_where_mkl_is_off_its_home_and_the_probe_agrees(monkeypatch, vendor, blas, speedup, expected):
    probes: list[int] = []

    def probe() -> float:
        probes.append(1)
        if speedup is None:
            raise AssertionError("the probe must not run when a flag decides")
        return speedup

    monkeypatch.setattr(choose, "cpu_info", lambda: _fake_cpu(vendor))
    monkeypatch.setattr(choose, "torch_blas", lambda: blas)
    monkeypatch.setattr(choose, "numpy_openblas", lambda: object())
    monkeypatch.setattr(choose, "probe_openblas_speedup", probe)
    choose.openblas_faster.cache_clear()
    try:
        assert choose.openblas_faster() is expected
        assert choose.openblas_faster() is expected
        assert len(probes) <= 1  # one-time
    finally:
        choose.openblas_faster.cache_clear()


def test_probe_measures_a_positive_ratio_once():
    if choose.numpy_openblas() is None:
        assert choose.probe_openblas_speedup() == 0.0
        return
    ratio = choose.probe_openblas_speedup()
    assert ratio > 0.0 and ratio == choose.probe_openblas_speedup()
