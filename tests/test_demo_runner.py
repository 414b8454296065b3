"""The demo's stage runner: order, failure isolation, skipping, resume by fingerprint."""
from __future__ import annotations

import json

import pytest

from ernie_vl.app.demo.runner import CACHED, DONE, FAILED, SKIPPED, STATE_FILE, Stage, StageRunner


def _stages(calls: list[str], fail: set[str] = frozenset(), params: dict | None = None) -> list[Stage]:
    def make(name: str, value: int):
        def fn(ctx):
            calls.append(name)
            if name in fail:
                raise RuntimeError(f"{name} broke")
            bar = ctx.bar(total=1)
            bar.update(1)
            upstream = sum(r["value"] for r in ctx.results.values())
            (ctx.out_dir / f"{name}.txt").write_text(str(value))
            return {"value": value + upstream}
        return fn

    params = params or {}
    return [
        Stage("a", "Stage A", make("a", 1), params=params.get("a", {}), outputs=("a.txt",)),
        Stage("b", "Stage B", make("b", 10), requires=("a",), params=params.get("b", {})),
        Stage("c", "Stage C", make("c", 100), requires=("b",)),
        Stage("d", "Stage D", make("d", 1000), requires=("a",)),
    ]


def test_runs_in_order_and_passes_results(tmp_path):
    calls: list[str] = []
    records = StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages(calls))
    assert calls == ["a", "b", "c", "d"]
    assert [r.status for r in records] == [DONE] * 4
    # b sees a (1) -> 11; c sees a + b (1 + 11) -> 112; d sees a + b + c -> 1000 + 124
    assert [r.result["value"] for r in records] == [1, 11, 112, 1124]
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["stages"]["c"]["result"] == {"value": 112}


def test_a_failure_is_recorded_and_independent_stages_go_on(tmp_path):
    calls: list[str] = []
    records = StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages(calls, fail={"b"}))
    status = {r.name: r.status for r in records}
    assert status == {"a": DONE, "b": FAILED, "c": SKIPPED, "d": DONE}
    assert calls == ["a", "b", "d"]
    b = records[1]
    assert b.error == "RuntimeError: b broke" and "Traceback" in b.traceback
    assert records[2].error == "needs b, which did not finish"


def test_rerun_reuses_finished_stages_and_retries_failed_ones(tmp_path):
    first: list[str] = []
    StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages(first, fail={"b"}))
    second: list[str] = []
    records = StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages(second))
    assert second == ["b", "c"]
    assert [r.status for r in records] == [CACHED, DONE, DONE, CACHED]
    assert records[0].result == {"value": 1} and records[2].result == {"value": 112}


def test_changed_params_rerun_the_stage_and_everything_after_it(tmp_path):
    StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages([]))
    calls: list[str] = []
    records = StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(
        _stages(calls, params={"b": {"minutes": 3}}))
    assert calls == ["b", "c"]
    assert [r.status for r in records] == [CACHED, DONE, DONE, CACHED]


def test_missing_output_file_reruns_the_stage(tmp_path):
    StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages([]))
    (tmp_path / "a.txt").unlink()
    calls: list[str] = []
    StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages(calls))
    assert calls == ["a"]  # a's fingerprint is unchanged, so b, c, d are reused


def test_no_resume_runs_everything_and_broken_state_is_ignored(tmp_path):
    StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(_stages([]))
    calls: list[str] = []
    StageRunner(tmp_path, show_progress=False, resume=False, log=lambda m: None).run(_stages(calls))
    assert calls == ["a", "b", "c", "d"]
    (tmp_path / STATE_FILE).write_text("{not json")
    notes: list[str] = []
    calls.clear()
    StageRunner(tmp_path, show_progress=False, log=notes.append).run(_stages(calls))
    assert calls == ["a", "b", "c", "d"] and "ignoring unreadable" in notes[0]


def test_bad_stage_lists_are_refused(tmp_path):
    runner = StageRunner(tmp_path, show_progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="unique"):
        runner.run([Stage("a", "A", lambda c: {}), Stage("a", "A", lambda c: {})])
    with pytest.raises(ValueError, match=r"requires \['z'\]"):
        runner.run([Stage("a", "A", lambda c: {}, requires=("z",))])


def test_a_result_json_cannot_store_fails_that_stage_only(tmp_path):
    stages = [Stage("a", "A", lambda c: {"x": object()}), Stage("b", "B", lambda c: {"y": 2})]
    records = StageRunner(tmp_path, show_progress=False, log=lambda m: None).run(stages)
    assert records[0].status == FAILED and "JSON cannot store" in records[0].error
    assert records[1].status == DONE and records[1].result == {"y": 2}


def test_demo_config_checks_its_values():
    from ernie_vl.app.demo import DemoConfig

    quick = DemoConfig.quick("x", num_videos=1)
    assert quick.num_videos == 1 and quick.max_train_steps == 40 and str(quick.out_dir) == "x"
    with pytest.raises(ValueError, match="train_minutes must be > 0, got 0"):
        DemoConfig(train_minutes=0)
    with pytest.raises(ValueError, match="num_heldout_images must be >= 1, got 0"):
        DemoConfig(num_heldout_images=0)
    with pytest.raises(ValueError, match="batch_videos must be >= 0, got -2"):
        DemoConfig(batch_videos=-2)
    assert DemoConfig(train_minutes=3).train_params() != DemoConfig(train_minutes=4).train_params()
