"""bench/train_synthetic.py's results: one row per variant kept across runs, verdicts computed on `divided`."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import ernie_vl

from tests._bench_helpers import load_bench


@pytest.fixture()
def ts():
    return load_bench("train_synthetic")


def _row(ts, name: str, t2i: float, top1: float, minutes: float = 10.0, max_steps: int | None = None) -> dict:
    metrics = {k: 0.5 for k in ts.METRIC_KEYS} | {"text_to_image_R@1": t2i, "video_top1": top1}
    run = {"name": name, "model": "tiny", "steps": 10, "setup_s": 1.0, "train_wall_s": 2.0, "cpu_s": 3.0,
           "samples_per_s": 4.0, "threads": 2, "metrics": metrics, "routing": {}, "curve": []}
    args = SimpleNamespace(minutes=minutes, max_steps=max_steps, clips_per_class=512)
    return ts.row_record(run, args, 1.5, f"bench/train_synthetic.py --only {name}")


def test_goals_apply_to_divided_and_the_other_variants_are_reported(ts):
    rows = {"space_only": _row(ts, "space_only", 0.95, 0.30), "divided": _row(ts, "divided", 0.92, 0.94)}
    verdicts = ts.verdicts(rows)
    divided = [v for v in verdicts if "`divided`" in v.what]
    met = {v.what.split(",")[0]: v.met for v in divided if v.met is not None}
    assert met == {"train_synthetic held-out text->image R@1 (unseen colour-shape combinations)": True,
                   "train_synthetic motion top-1": False}  # 0.94 < 0.95
    assert all(v.met is None for v in verdicts if "`space_only`" in v.what)
    assert any(v.measured == "0.940" for v in divided)


def test_a_run_shorter_than_the_goal_budget_is_reported_without_a_verdict(ts):
    short = ts.verdicts({"divided": _row(ts, "divided", 0.3, 0.4, minutes=0, max_steps=100)})
    assert short and all(v.met is None for v in short)
    assert all("100 steps" in v.what for v in short)


def test_report_holds_every_stored_row_with_its_budget_and_load(ts, tmp_path):
    rows = {"divided": _row(ts, "divided", 0.92, 0.96), "ernie45": _row(ts, "ernie45", 0.7, 0.8)}
    args = SimpleNamespace(minutes=10.0, max_steps=None)
    text = ts.write_report(tmp_path / "x.md", rows, 0.0, args, ".venv/bin/python bench/train_synthetic.py")
    assert "| metric | goal | divided | ernie45 |" in text
    assert "| text_to_image_R@1 | >= 0.8 | 0.920 | 0.700 |" in text
    assert "| budget | | 10 min | 10 min |" in text
    assert "--only ernie45" in text
    assert ts.budget_text(0, 100) == "100 steps" and ts.budget_text(10.0, 2000) == "10 min, <= 2000 steps"


def test_rows_record_their_encoders_and_a_row_of_other_encoders_is_stale(ts, tmp_path):
    """A row that ran other encoders than its variant builds now (a preset changed since) is marked stale in the
    table and gets no verdict, whether it recorded its encoders or predates the record."""
    linear, stem = ts.expected_encoders("ernie45_linear"), ts.expected_encoders("ernie45_stem")
    assert linear["image_encoder"]["conv_stem"] == 0 and linear["video_encoder"]["conv_stem"] == 0
    assert stem["image_encoder"]["conv_stem"]["channels"] == [16, 32, 64]
    assert stem["video_encoder"]["conv_stem"] == {"channels": [16, 32, 64], "frame_diff": True, "time_kernel": 3}
    assert ts.expected_encoders("ernie45") == stem  # the preset has tiny's conv tokenizers
    assert ts.expected_encoders("divided") == ts.encoders_of(ernie_vl.load_config("tiny"))

    current = _row(ts, "divided", 0.92, 0.96) | {"encoders": ts.expected_encoders("divided")}
    other = _row(ts, "ernie45", 0.7, 0.8) | {"encoders": linear}
    old = _row(ts, "ernie45_linear", 0.6, 0.7) | {"written": "2026-12-07 17:39 UTC"}  # no record, still current
    before = _row(ts, "ernie45", 0.6, 0.7) | {"written": "2026-12-07 17:39 UTC"}
    assert ts.stale_reason(current) is None and ts.stale_reason(old) is None
    assert "other encoders" in ts.stale_reason(other)
    assert ts.ENCODERS_CHANGED["ernie45"] in ts.stale_reason(before)
    assert "no longer exists" in ts.stale_reason(current | {"name": "gone"})

    rows = {"divided": current, "ernie45": other, "ernie45_linear": old}
    text = ts.write_report(tmp_path / "x.md", rows, 0.0, SimpleNamespace(minutes=10.0, max_steps=None), "cmd")
    assert "| metric | goal | divided | ernie45 (stale) | ernie45_linear |" in text
    assert "Stale rows (not what the variant builds now; reported without a verdict): `ernie45`: ran other" in text
    stale = [v for v in ts.verdicts(rows) if "`ernie45`" in v.what]
    assert stale and all(v.met is None and "(stale: " in v.what for v in stale)
    met = [v.met for v in ts.verdicts(rows) if "`divided`" in v.what and v.met is not None]
    assert met == [True, True]
    # a goal-budget divided row that ran other encoders loses its verdict too
    assert all(v.met is None for v in ts.verdicts({"divided": current | {"encoders": linear}}))
