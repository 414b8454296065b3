"""``ernie-vl quantize``: post-training int8 and QAT int8 checkpoints, held-out metrics, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import ernie_vl
from ernie_vl.quantize import quantization_scheme
from tests._train_helpers import MOTION, make_tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    ernie_vl.create_model("test", class_names=sorted(MOTION)).save_pretrained(str(folder))
    return folder


def _report(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n"):])


def test_post_training_int8_with_held_out_metrics(data, checkpoint, tmp_path, capsys):
    from ernie_vl.app.cli import main

    out = tmp_path / "int8"
    rc = main(["quantize", str(checkpoint), "--out", str(out), "--val-pairs", str(data["val_pairs"]),
               "--val-videos", str(data["val_videos"]), "--no-progress"])
    assert rc == 0
    report = _report(capsys)
    assert report["qat_steps"] == 0 and report["bytes_int8"] < 0.5 * report["bytes_fp32"]
    for name in ("fp32", "int8"):
        assert set(report[name]) >= {"text_to_image_R@1", "image_to_text_R@1", "video_top1", "video_zeroshot_top1"}
        assert report[name]["video_top5"] == 1.0  # 4 classes: the top 5 holds all of them
    loaded = ernie_vl.ErnieVL.from_pretrained(str(out))
    assert quantization_scheme(loaded) is not None


def test_qat_fine_tunes_then_writes_the_int8_model(data, checkpoint, tmp_path, capsys):
    from ernie_vl.app.cli import main

    ptq, qat = tmp_path / "ptq", tmp_path / "qat"
    assert main(["quantize", str(checkpoint), "--out", str(ptq), "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["quantize", str(checkpoint), "--out", str(qat), "--qat-steps", "2", "--pairs", str(data["pairs"]),
               "--videos", str(data["videos"]), "--val-pairs", str(data["val_pairs"]), "--batch-pairs", "8",
               "--batch-videos", "4", "--num-workers", "0", "--threads", "1", "--lr", "1e-3", "--no-progress"])
    assert rc == 0
    report = _report(capsys)
    assert report["qat"]["steps"] == 2
    assert {"fp32", "int8_post_training", "int8"} <= set(report)
    a, b = (ernie_vl.ErnieVL.from_pretrained(str(f)) for f in (ptq, qat))
    assert quantization_scheme(b) == quantization_scheme(a) is not None
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    changed = [k for k in sa if sa[k].dtype == torch.int8 and not torch.equal(sa[k], sb[k])]
    assert changed  # the fine-tuning moved the int8 weights


def test_bad_requests_are_refused(data, checkpoint, tmp_path, capsys):
    from ernie_vl.app.cli import main

    assert main(["quantize", str(checkpoint), "--out", str(tmp_path / "a"), "--qat-steps", "3"]) == 2
    assert "needs training data" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not an ErnieVL checkpoint" in capsys.readouterr().err
    int8 = tmp_path / "int8"
    assert main(["quantize", str(checkpoint), "--out", str(int8), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(int8), "--out", str(tmp_path / "c")]) == 2
    assert "already an int8" in capsys.readouterr().err
