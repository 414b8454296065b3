"""bench/int8_accuracy.py's verdicts: the loss against fp32 in points, at most 1, per metric and precision."""
from __future__ import annotations

from tests._bench_helpers import load_bench


def test_verdicts_compare_each_precision_with_fp32_in_points():
    m = load_bench("int8_accuracy")
    at5 = ["text_to_image_R@5", "image_to_text_R@5", "video_top5", "video_zeroshot_top5"]
    base = dict.fromkeys([*m.METRICS, *at5], 0.5)
    rows = {"fp32": base, "int8 PTQ": base | {"video_top1": 0.49},  # exactly 1 point lower: within
            "int8 PTQ (serve --precision int8)": base, "bf16": base | {"text_to_image_R@1": 0.485},
            "int8 QAT 300 steps": base | {"video_zeroshot_top1": 0.53}, m.FLOAT_AFTER_QAT: base | {"video_top1": 0.1}}
    verdicts = m.verdicts(rows, "`tiny` trained here 300 steps")
    assert len(verdicts) == 3 * len(m.METRICS)  # PTQ, bf16, QAT; the float-after-QAT and serve rows are reported

    def find(name, label):
        (v,) = [v for v in verdicts if v.what.startswith(f"{name} - fp32, held-out {label},")]
        return v

    ptq_top1 = find("int8 PTQ", "motion top-1, supervised")
    assert ptq_top1.met is True and ptq_top1.claim == "11" and ptq_top1.measured.startswith("-1.0 points")
    assert find("int8 PTQ", "motion top-1, zero-shot").measured.startswith("+0.0 points")
    bf16 = find("bf16", "text->image R@1")
    assert bf16.met is False and bf16.claim == "-" and bf16.measured.startswith("-1.5 points")
    assert find("int8 QAT 300 steps", "motion top-1, zero-shot").measured.startswith("+3.0 points")
    assert all("300 steps" in v.what for v in verdicts)
    text = m.markdown(rows, {"model": "x", "qat": "y", "kernel": "auto", "seconds": {}}, "cmd",
                      type("F", (), {"line": lambda self: "CPU"})())
    assert "| motion top-1, supervised | 0.500 | 0.490 (-1.0) |" in text


def test_each_run_works_in_a_fresh_folder_unless_one_is_given(tmp_path):
    # an earlier run's data, checkpoint or QAT state is never picked up by the default
    m = load_bench("int8_accuracy")
    args = m.parse_args([])
    assert args.work is None
    with m.work_folder(args.work, "ernie_test-") as first:
        (first / "qat").mkdir()
        (first / "qat" / "train_state.safetensors").write_bytes(b"state of this run")
        with m.work_folder(m.parse_args([]).work, "ernie_test-") as second:
            assert second != first and list(second.iterdir()) == []
    assert not first.exists() and not second.exists()  # removed at the end
    given = tmp_path / "w"
    args = m.parse_args(["--work", str(given), "--qat-steps", "5"])
    with m.work_folder(args.work, "ernie_test-") as work:
        assert work == given and work.is_dir()
        (work / "kept").write_text("x")
    assert (given / "kept").read_text() == "x"      # a folder the user names is kept

