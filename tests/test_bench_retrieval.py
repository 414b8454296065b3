"""bench/retrieval.py's small-batch rows: every method at 1 and 8 queries per call, taking turns, no verdict."""
from __future__ import annotations

import re
import time

import numpy as np

from tests._bench_helpers import load_bench


def test_small_batch_rows_time_every_method_in_rotated_turns():
    m = load_bench("retrieval")
    calls: list[tuple[str, int]] = []

    def method(name):
        def search(batch):
            calls.append((name, len(batch)))
            time.sleep(0.0005)  # something to time (the figures are not checked)
        return search

    names = ("ours flat", "FAISS IndexFlatIP", "torch matmul+topk", "torch matmul+topk (D, N)")
    fns = {name: method(name) for name in names}
    q = np.zeros((max(m.SMALL_BATCHES) * m.SMALL_CALLS, 4), np.float32)
    lines: list[str] = []
    m.small_batch_rows(fns, names[1:], q, rounds=5, n=1000, data_kind="random", lines=lines)
    for size in m.SMALL_BATCHES:
        timed = [c for c in calls if c[1] == size]
        # one warm-up per method, then 5 rounds of SMALL_CALLS calls each
        assert {name: sum(1 for c in timed if c[0] == name) for name in names} == dict.fromkeys(names, 1 + 5 * m.SMALL_CALLS)
        turns = [c[0] for c in timed[len(names):]]
        firsts = {turns[i] for i in range(0, len(turns), len(names))}
        assert firsts == set(names)  # who goes first rotates call by call
    rows = [line for line in lines if re.match(r"\| (1|8) \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "8"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6 and all(float(c) > 0 for c in cells[1:5])
        assert re.fullmatch(r"\*\*\d+\.\d\dx\*\* \((\d+\.\d\d, ){4}\d+\.\d\d\)", cells[5])
    assert "no goal" in lines[0]
