"""`ernie-vl classify` and `ernie-vl eval-video` with a stand-in model behind ernie_vl.app.hub.load_model."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from _video_fixtures import with_garbage_packets, write_clip, write_mjpeg_clip, write_solid_clip
from _video_models import BlueLevelClassifier, ColourEmbedder, ColourTokenizer
from ernie_vl.app.cli import main


@dataclass
class FakeLoaded:  # the LoadedModel contract: (model, preprocess, tokenizer, model_id)
    model: object
    preprocess: object
    tokenizer: object
    model_id: str


class Preprocess:
    image_size, mean, std = 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@pytest.fixture
def fake_hub(monkeypatch):
    models = {}

    def load_model(spec):
        if spec not in models:
            raise ValueError(f"unknown model {spec!r}")
        return models[spec]

    try:
        import ernie_vl.app.hub as hub  # the real module, when it exists
        monkeypatch.setattr(hub, "load_model", load_model)
    except ImportError:
        monkeypatch.setitem(sys.modules, "ernie_vl.app.hub", types.SimpleNamespace(load_model=load_model))
    head = BlueLevelClassifier([0.0, 0.5, 1.0])
    head.class_names = ["low", "mid", "high"]
    models["supervised"] = FakeLoaded(head, Preprocess(), None, "stand-in-head")
    models["zeroshot"] = FakeLoaded(ColourEmbedder(), Preprocess(), ColourTokenizer(), "stand-in-embedder")
    return models


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for name, blue in (("low", 0), ("mid", 128), ("high", 255)):
        (root / "set" / name).mkdir(parents=True)
        write_clip(root / "set" / name / "x.mp4", num_frames=16, blue=blue)
    write_clip(root / "set" / "mid" / "y.mp4", num_frames=16, blue=250)  # looks "high"
    for name, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        write_solid_clip(root / f"{name}.mp4", rgb)
    (root / "bad.mp4").write_text("nope")
    return root


def test_classify_prints_topk(fake_hub, videos, capsys):
    code = main(["classify", "supervised", str(videos / "set" / "mid" / "x.mp4"), str(videos / "set" / "low" / "x.mp4"),
                 "--topk", "2", "--frames", "4", "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["labels"] for r in out] == [["mid", "low"], ["low", "mid"]]
    assert all(r["scores"][0] > 0.5 and r["error"] is None for r in out)


def test_classify_reports_bad_files_with_exit_code(fake_hub, videos, capsys):
    code = main(["classify", "supervised", str(videos / "bad.mp4"), str(videos / "set" / "high" / "x.mp4"),
                 "--topk", "1", "--frames", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "error: not a readable media container" in captured.out
    assert "high" in captured.out.splitlines()[-1]
    assert "1 of 2 videos could not be decoded" in captured.err


def test_classify_zero_shot_with_labels_file(fake_hub, videos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\n\ngreen\nblue\n")
    code = main(["classify", "zeroshot", str(videos / "blue.mp4"), str(videos / "red.mp4"), "--zero-shot",
                 "--labels", str(labels), "--templates", "a video of {label}.", "--frames", "2", "--topk", "1",
                 "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["labels"] for r in out] == [["blue"], ["red"]]
    assert fake_hub["zeroshot"].tokenizer.prompts == ["a video of red.", "a video of green.", "a video of blue."]


def test_eval_video_writes_metrics_and_confusion(fake_hub, videos, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    code = main(["eval-video", "supervised", str(videos / "set"), "--views", "2x1", "--out", str(out_dir),
                 "--frames", "2", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "top-1 75.00%" in printed and "top-5 100.00%" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(0.75) and metrics["num_evaluated"] == 4
    assert metrics["classes"] == ["low", "mid", "high"]  # the model's class order
    counts = json.loads((out_dir / "confusion.json").read_text())["counts"]
    assert counts == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert (out_dir / "confusion.png").stat().st_size > 1000


def test_damaged_and_unreadable_files_are_counted_in_the_summaries(fake_hub, videos, tmp_path, capsys):
    """A folder of good, damaged (one frame concealed), badly damaged and unreadable files: both commands finish."""
    root = tmp_path / "mixed"
    for name in ("low", "high"):
        (root / name).mkdir(parents=True)
    clean = write_mjpeg_clip(tmp_path / "clean.mp4", num_frames=16)
    write_clip(root / "low" / "good.mp4", num_frames=16, blue=0)
    with_garbage_packets(clean, root / "high" / "one_bad.mp4", [6])  # TSN, 4 of 16 frames: 2, 6, 10, 14 (1 of 4)
    with_garbage_packets(clean, root / "high" / "two_bad.mp4", [2, 10])  # 2 of 4 sampled frames: fails
    (root / "high" / "unreadable.mp4").write_text("nope")
    out_dir = tmp_path / "eval"
    code = main(["eval-video", "supervised", str(root), "--out", str(out_dir), "--frames", "4", "--workers", "0",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "videos 2/4" in printed
    assert "failed 2  concealed 1 clip(s) (1 frame(s)" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert (metrics["num_failed"], metrics["num_concealed_clips"], metrics["num_concealed_frames"]) == (2, 1, 1)
    assert metrics["concealed"][0]["path"].endswith("one_bad.mp4") and metrics["concealed"][0]["frames"] == [6]
    code = main(["classify", "supervised", str(root / "high" / "one_bad.mp4"), str(root / "high" / "unreadable.mp4"),
                 "--frames", "4", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "concealed frames [6]" in captured.out and "error:" in captured.out
    assert "1 of 2 videos had frames concealed" in captured.err and "1 of 2 videos could not be decoded" in captured.err


def test_cli_errors(fake_hub, videos, capsys):
    assert main(["classify", "zeroshot", str(videos / "red.mp4"), "--no-progress"]) == 2
    assert "no class names" in capsys.readouterr().err
    assert main(["eval-video", "supervised", str(videos / "nowhere"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["classify", "supervised", str(videos / "red.mp4"), "--views", "2x2", "--no-progress"]) == 2
    assert "num_crops" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_with_a_real_checkpoint(videos, tmp_path, capsys):
    import torch

    import ernie_vl
    from video import open_video
    from video.sampling import TSNSampler
    from video.transforms import build_clip_transform

    model = ernie_vl.create_model("test", num_classes=3, class_names=["low", "mid", "high"])
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    clip_path = videos / "set" / "mid" / "x.mp4"
    code = main(["classify", str(ckpt), str(clip_path), "--topk", "3", "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)[0]
    assert code == 0 and sorted(out["labels"]) == ["high", "low", "mid"]
    # the same numbers by hand: TSN centres of the model's frame count, its transform, softmax
    t = model.cfg.video_encoder.num_frames
    reader = open_video(clip_path)
    indices = TSNSampler(t)(len(reader)).indices
    pre = model.preprocess
    clip = build_clip_transform(False, pre.image_size, pre.mean, pre.std)(reader.get_frames(indices))
    with torch.inference_mode():
        probs = model.eval().classify_video(clip[None]).softmax(-1)[0]
    expect = {name: float(probs[i]) for i, name in enumerate(model.class_names)}
    assert all(abs(expect[label] - score) < 1e-5 for label, score in zip(out["labels"], out["scores"]))
    code = main(["eval-video", str(ckpt), str(videos / "set"), "--views", "1x3", "--out", str(tmp_path / "ev"),
                 "--workers", "0", "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_evaluated"] == 4 and metrics["classes"] == ["low", "mid", "high"]
    assert sum(map(sum, json.loads((tmp_path / "ev" / "confusion.json").read_text())["counts"])) == 4


def test_classify_zero_shot_with_per_class_prompts_file(fake_hub, videos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\nblue\n")
    prompts = tmp_path / "prompts.json"
    # "red" is described by blue prompts only, so the blue clip must now be labelled "red"
    prompts.write_text(json.dumps({"red": ["a blue thing", "blue again"]}))
    code = main(["classify", "zeroshot", str(videos / "blue.mp4"), "--zero-shot", "--labels", str(labels),
                 "--prompts", str(prompts), "--templates", "a video of {label}.", "--frames", "2", "--topk", "2",
                 "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out[0]["labels"][0] == "red"
    assert abs(out[0]["scores"][0] - out[0]["scores"][1]) < 1e-5  # both classes now embed as "blue"
    assert fake_hub["zeroshot"].tokenizer.prompts == ["a blue thing", "blue again", "a video of blue."]


def test_prompts_file_naming_an_unknown_class_is_refused(fake_hub, videos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\nblue\n")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"purple": ["a purple thing"]}))
    code = main(["classify", "zeroshot", str(videos / "blue.mp4"), "--zero-shot", "--labels", str(labels),
                 "--prompts", str(prompts), "--frames", "2", "--no-progress"])
    assert code != 0 and "['purple'] that are not among the classes" in capsys.readouterr().err
