"""bench/_report.py: rotated medians read every clock around the same calls, in rotated order."""
from __future__ import annotations

import pytest

from _bench_helpers import load_bench


def test_every_clock_times_the_same_calls_and_the_order_rotates():
    report = load_bench("_report")
    wall, cpu, order = [0.0], [0.0], []

    def run(key: str, cost: float):
        def call():
            order.append(key)
            wall[0] += 2 * cost  # a loaded machine: the wall clock runs twice as fast as the work
            cpu[0] += cost
        return call

    runs = {"a": run("a", 0.001), "b": run("b", 0.003)}
    out = report.rotated_medians_by_clock(runs, rounds=3, steps=2, clocks={"wall": lambda: wall[0], "cpu": lambda: cpu[0]})
    assert out == {"wall": {"a": pytest.approx(2.0), "b": pytest.approx(6.0)},
                   "cpu": {"a": pytest.approx(1.0), "b": pytest.approx(3.0)}}  # ms per call
    assert order == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]  # warm-up, rotated
    assert report.rotated_medians(runs, 5, 1, clock=lambda: cpu[0]) == {"a": pytest.approx(1.0), "b": pytest.approx(3.0)}
