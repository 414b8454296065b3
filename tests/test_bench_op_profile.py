"""bench/_op_profile.py: per-op thread CPU time is recorded per op and shape, and 5-D clip ops are told apart."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _bench_helpers import load_bench


def test_the_convolution_carries_the_convolution_time_and_clip_rows_keep_only_batch_tensors():
    prof = load_bench("_op_profile")
    torch.manual_seed(0)
    clips = torch.randn(2, 4, 6, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(8, 4, 3, 3, 3, requires_grad=True)
    small = torch.randn(3, 3)

    def run():
        F.conv3d(clips, weight, padding=1).square().sum().backward()
        small @ small

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = prof.op_cpu_times(run, 3)
    finally:
        torch.set_num_threads(previous)
    conv = times["convolution", "2x4x6x16x16 (channels-last)"]
    backward = [ms for (op, _), ms in times.items() if op == "convolution_backward"]
    assert conv > 0 and len(backward) == 1 and backward[0] > 0
    assert ("mm", "3x3") in times  # every op is recorded, under its first tensor's shape
    assert prof.is_clip_tensor("2x4x6x16x16 (channels-last)", 2) and not prof.is_clip_tensor("8x4x3x3x3", 2)
    assert prof.clip_tensor_ms(times, 2) >= conv
    rows = prof.five_d_rows(times, 2, min_ms=0.0)
    assert rows[:2] == ["| op | first input (B, C, T, H, W) | ms / step |", "|---|---|---|"]
    assert any(r.startswith("| convolution | 2x4x6x16x16 (channels-last) |") for r in rows)
    assert not any("8x4x3x3x3" in r or "| 3x3 |" in r for r in rows)
    assert any(r.startswith("| all convolution ops") for r in rows)
    assert prof.family("convolution_backward") == "convolution" and prof.family("gelu_backward") == "GELU"
    assert prof.family("addmm") == "other"


def test_more_than_one_thread_is_refused():
    prof = load_bench("_op_profile")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="needs one intra-op thread.*got 2"):
            prof.op_cpu_times(lambda: None, 1)
    finally:
        torch.set_num_threads(previous)
