"""Shared pytest setup: deterministic, CPU-only, small thread count."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def kernel(request):
    """Run the test body with the int8 GEMM kernel ``request.param`` selected (parametrize with
    ``indirect=True``), then restore the kernel policy."""
    from ernie_vl.quantize import set_int8_kernel

    previous = set_int8_kernel(request.param)
    yield request.param
    set_int8_kernel(previous)
