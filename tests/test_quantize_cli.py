"""``ernie-vl quantize``: post-training int8 and QAT int8 checkpoints, held-out metrics, clear errors, QAT resume."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ernie_vl
from ernie_vl.quantize import quantization_scheme
from tests._train_helpers import MOTION, kill_at, make_tiny_data, tiny_config


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
    out = capsys.readouterr().out if hasattr(capsys, "readouterr") else capsys.out
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
    assert report["qat"]["work"] is None and not (tmp_path / "qat.qat").exists()  # the default work folder went


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


def _qat_args(data, model, out, work, steps=5, *extra) -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--work", str(work), "--qat-steps", str(steps), "--pairs",
            str(data["pairs"]), "--videos", str(data["videos"]), "--batch-pairs", "8", "--batch-videos", "4",
            "--num-workers", "0", "--threads", "1", "--lr", "1e-3", "--checkpoint-every", "2", *extra]


@pytest.fixture(scope="module")
def interrupted(data, checkpoint, tmp_path_factory):
    """A QAT run of 5 steps killed in step 4 (its state saved at step 2)."""
    from ernie_vl.app.cli import main

    root = tmp_path_factory.mktemp("interrupted")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stderr(err):
        kill_at(m, 4)
        assert main(_qat_args(data, checkpoint, root / "int8", root / "work", 5, "--no-progress")) == 130
    assert "QAT state of step 2 is saved" in err.getvalue() and "--resume" in err.getvalue(), err.getvalue()
    assert not (root / "int8").exists()
    return root


def test_an_interrupted_qat_run_resumes_to_the_weights_of_an_unbroken_one(data, checkpoint, interrupted,
                                                                         tmp_path, capsys):
    from ernie_vl.app.cli import main
    from ernie_vl.train.checkpointing import load_training_state

    work = tmp_path / "work"
    shutil.copytree(interrupted / "work", work)  # the module's interrupted run stays as it is for the other tests
    assert load_training_state(work)["step"] == 2
    assert main(_qat_args(data, checkpoint, tmp_path / "full", tmp_path / "full_work", 5, "--no-progress")) == 0
    capsys.readouterr()
    assert main(_qat_args(data, checkpoint, tmp_path / "resumed", work, 5, "--resume")) == 0
    captured = capsys.readouterr()
    report = _report(captured)
    assert report["qat"]["resumed_at_step"] == 2 and report["qat"]["steps"] == 5
    assert "5/5" in captured.err  # the progress bar ran to the last step
    assert report["qat"]["work"] == str(work) and (work / "train_state.safetensors").is_file()  # --work is kept
    # the losses of the resumed steps and every float weight the fine-tuning reached match the unbroken run
    logs = [[json.loads(line) for line in open(w / "log.jsonl", encoding="utf-8")] for w in (tmp_path / "full_work", work)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5]
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0), a["step"]
    fa, fb = (load_file(str(w / "final" / "model.safetensors")) for w in (tmp_path / "full_work", work))
    assert fa.keys() == fb.keys()
    assert max(float((fa[k].float() - fb[k].float()).abs().max()) for k in fa) <= 1e-6
    # and so do the int8 checkpoints written from them
    ia, ib = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "resumed"))
    assert ia.keys() == ib.keys()
    for k in ia:
        if ia[k].dtype == torch.int8:
            assert torch.equal(ia[k], ib[k]), k
        else:
            assert torch.allclose(ia[k].float(), ib[k].float(), rtol=0, atol=1e-6), k
    # the saved run moved away from the start: it is the fine-tuned model that matched, not the initial one
    start = ernie_vl.ErnieVL.from_pretrained(str(checkpoint)).state_dict()
    assert any(not torch.allclose(start[k].float(), fb[k].float()) for k in fb if k in start)


def test_a_qat_state_without_the_training_settings_resumes_without_a_warning(data, checkpoint, interrupted,
                                                                             tmp_path, capsys):
    """The QAT fingerprint was checked: a state saved before runs recorded their training settings needs no
    'cannot be checked' warning."""
    import warnings

    from ernie_vl.app.cli import main
    from ernie_vl.train import checkpointing as ckpt
    from ernie_vl.train.run_settings import FINGERPRINT_KEY

    work = tmp_path / "work"
    shutil.copytree(interrupted / "work", work)
    state = ckpt.load_training_state(work)
    del state[FINGERPRINT_KEY]
    ckpt.save_training_state(work, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_qat_args(data, checkpoint, tmp_path / "int8", work, 5, "--resume", "--no-progress")) == 0
    assert not [w for w in caught if "cannot be checked" in str(w.message)]
    assert _report(capsys.readouterr())["qat"]["resumed_at_step"] == 2


@pytest.mark.parametrize("change, named", [
    (["--lr", "2e-3"], "lr 0.001 then, 0.002 now"),
    (["--batch-pairs", "4"], "batch_pairs 8 then, 4 now"),
    (["--other-model"], "model_weights_sha256"),
], ids=["lr", "batch", "model"])
def test_resume_refuses_another_model_or_settings(data, checkpoint, interrupted, tmp_path, capsys, change, named):
    from ernie_vl.app.cli import main

    model = checkpoint
    if change == ["--other-model"]:
        torch.manual_seed(1)
        model = tmp_path / "other"
        ernie_vl.create_model("test", class_names=sorted(MOTION)).save_pretrained(str(model))
        change = []
    args = _qat_args(data, model, tmp_path / "int8", interrupted / "work", 5, "--resume", "--no-progress")
    for i in range(0, len(change), 2):  # a later flag overrides the earlier one
        args += change[i:i + 2]
    before = (interrupted / "work" / "train_state.safetensors").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "started from another model or with other settings" in err and named in err
    assert (interrupted / "work" / "train_state.safetensors").read_bytes() == before  # nothing overwritten
    assert not (tmp_path / "int8").exists()


def test_resume_refuses_a_plain_training_run_and_needs_qat_steps(data, checkpoint, tmp_path, capsys):
    from ernie_vl.app.cli import main
    from ernie_vl.train import train

    train(tiny_config(data, tmp_path / "run", max_steps=1))
    assert main(_qat_args(data, checkpoint, tmp_path / "int8", tmp_path / "run", 3, "--resume", "--no-progress")) == 2
    assert "not a QAT run" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert "--resume continues an interrupted QAT run" in capsys.readouterr().err
