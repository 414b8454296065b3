"""bench/moe_balance.py's measures: load CV, drops at capacity 1.0, per-step series from a training log."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def mb():
    sys.path.append(str(BENCH))  # after the packages: bench/encoders.py must not shadow ``encoders``
    try:
        spec = importlib.util.spec_from_file_location("moe_balance", BENCH / "moe_balance.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_load_cv_and_drops_at_capacity_one(mb):
    assert mb.load_cv([5, 5, 5, 5]) == 0.0
    assert mb.load_cv([8, 0, 0, 0]) == pytest.approx(3 ** 0.5)
    # 12 assignments over 4 experts: 3 slots each; 6 + 4 go over -> (3 + 1) / 12 dropped
    assert mb.dropped_at_capacity([6, 4, 1, 1]) == pytest.approx(4 / 12)
    assert mb.dropped_at_capacity([3, 3, 3, 3]) == 0.0


def test_step_series_and_windows_from_a_training_log(mb, tmp_path):
    log = tmp_path / "log.jsonl"
    layer = {"tokens_per_expert": [6, 4, 1, 1], "overlap_rate": 0.5}
    records = [{"step": s, "routing": {"layers": [layer, {**layer, "overlap_rate": None}]}} for s in range(1, 7)]
    log.write_text("\n".join(json.dumps(r) for r in [{"setup": 1}] + records) + "\n")
    rows = mb.step_series(log)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["drop"] == pytest.approx(4 / 12) and rows[0]["overlap"] == 0.5
    wins = mb.windows(rows, 3)
    assert [w["steps"] for w in wins] == ["1-2", "3-4", "5-6"] and wins[0]["cv"] == pytest.approx(rows[0]["cv"])
    variants = mb.variants(0.002, 0.01)
    assert variants["bias_only"]["backbone"]["moe"] == {"load_balance_coef": 0.0, "bias_gamma": 0.002}
    assert "bias_gamma" not in variants["lb_loss"]["backbone"]["moe"]
