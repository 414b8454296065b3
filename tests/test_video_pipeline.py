"""classify / evaluate / zero-shot with stand-in models; multi-view averaging; confusion outputs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from _video_fixtures import coded_index, reference_frames, write_clip, write_solid_clip
from _video_models import BlueLevelClassifier, ColourEmbedder, ColourTokenizer
from video import VideoFolder, ZeroShotClassifier, classify, evaluate, parse_views
from video.transforms import build_clip_transform
from video.views import MultiViewDataset, ViewSpec, average_views


def identity(size: int = 16):
    return build_clip_transform(train=False, image_size=size, mean=(0, 0, 0), std=(1, 1, 1))


@pytest.fixture(scope="module")
def tinted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinted")
    for name in ("low", "mid", "high"):
        (root / name).mkdir()
    write_clip(root / "low" / "a.mp4", num_frames=24, blue=0)
    write_clip(root / "low" / "b.mp4", num_frames=16, blue=0)
    write_clip(root / "mid" / "c.mp4", num_frames=24, blue=128)
    write_clip(root / "high" / "d.mp4", num_frames=24, blue=255)
    write_clip(root / "high" / "e.mp4", num_frames=24, blue=110)  # nearer "mid": misclassified
    (root / "high" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    return root


def test_parse_views_and_average():
    assert parse_views("4x3") == ViewSpec(4, 3)
    assert parse_views("2") == ViewSpec(2, 1)
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        parse_views("4by3")
    with pytest.raises(ValueError, match="num_crops"):
        parse_views("1x2")
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    p1 = torch.tensor([math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)])
    expect = ((p1 + torch.tensor([0.5, 0.5])) / 2).log()
    assert torch.allclose(average_views(logits, "prob")[0], expect)
    assert torch.allclose(average_views(logits, "logits")[0], torch.tensor([1.0, 0.0]))


def test_multi_view_items_hold_every_clip_and_crop(tinted):
    ds = VideoFolder(tinted, num_frames=2, sampling="tsn", transform=identity())
    mv = MultiViewDataset(ds, "2x3")
    first = [p.split("/")[-1] for p, _ in ds.samples].index("a.mp4")  # 24 frames, class "low"
    assert mv[0] is None and ds.failures[-1].path.endswith("broken.mp4")
    views, label, index = mv[first]
    assert views.shape == (6, 2, 3, 16, 16) and label == 1 and index == first
    # TSN over 24 frames, 2 segments of 12: view 0 at offset 3, view 1 at offset 9
    red = views[:, :, 0].mean(dim=(2, 3)) * 255
    assert coded_index(red[0]) == [3, 15] and coded_index(red[3]) == [9, 21]
    # exact: every view is the transform of PyAV's sequential decode of those frames, crop by crop
    frames = torch.from_numpy(reference_frames(ds.samples[first][0], [3, 15, 9, 21]))
    for view in range(6):
        clip_frames = frames[:2] if view < 3 else frames[2:]
        assert torch.equal(views[view], ds.transform(clip_frames, crop_index=view % 3, num_crops=3))
    # the three crops of one clip come from the left, centre and right of the 16x21 frame
    assert not torch.equal(views[0], views[2])


def test_evaluate_metrics_confusion_and_files(tinted, tmp_path):
    ds = VideoFolder(tinted, num_frames=4, sampling="tsn", transform=identity())
    model = BlueLevelClassifier([1.0, 0.0, 0.5])  # classes sorted: high, low, mid
    result = evaluate(model, ds, views="2x3", batch_size=2, num_workers=0, out_dir=tmp_path, progress=False)
    assert ds.classes == ["high", "low", "mid"]
    assert result.num_videos == 6 and result.num_evaluated == 5
    assert model.clips_seen == 5 * 6
    # high: d right, e predicted mid; low: both right; mid: right
    assert result.confusion.tolist() == [[1, 0, 1], [0, 2, 0], [0, 0, 1]]
    assert result.top1 == pytest.approx(4 / 5)
    assert result.top5 == pytest.approx(1.0)
    assert result.per_class_accuracy == {"high": 0.5, "low": 1.0, "mid": 1.0}
    assert [f["path"].split("/")[-1] for f in result.failures] == ["broken.mp4"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(0.8) and metrics["num_failed"] == 1 and metrics["views"] == "2x3"
    confusion = json.loads((tmp_path / "confusion.json").read_text())
    assert confusion["counts"] == result.confusion.tolist() and confusion["classes"] == ds.classes
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "classes.json").read_text()) == {"high": 0, "low": 1, "mid": 2}
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    wrong = [p for p in preds if p["label"] != p["predicted"]]
    assert len(preds) == 5 and [w["path"].split("/")[-1] for w in wrong] == ["e.mp4"]


def test_classify_topk_in_input_order_with_errors(tinted):
    model = BlueLevelClassifier([0.0, 0.5, 1.0])
    paths = [tinted / "mid" / "c.mp4", tinted / "low" / "a.mp4", tinted / "missing.mp4", tinted / "high" / "d.mp4"]
    results = classify(model, paths, class_names=["low", "mid", "high"], topk=2, num_frames=4,
                       transform=identity(), views="1x1", progress=False)
    assert [r.labels[:1] for r in results] == [["mid"], ["low"], [], ["high"]]
    assert results[2].error == "file does not exist"
    for r in (results[0], results[1], results[3]):
        assert len(r.scores) == 2 and r.scores[0] >= r.scores[1] and sum(r.scores) <= 1.0 + 1e-6
        assert r.error is None
    # the probabilities are the softmax of the stand-in's logits for the clip's mean blue
    clip = identity()(__import__("video").open_video(paths[1]).get_frames([1, 7, 13, 19])).unsqueeze(0)
    probs = model.classify_video(clip).softmax(-1)[0]
    assert results[1].scores[0] == pytest.approx(probs.max().item(), rel=1e-5)
    with pytest.raises(ValueError, match="no class names"):
        classify(model, paths, progress=False)
    with pytest.raises(TypeError, match="classify_video"):
        classify(object(), paths, class_names=["a"], progress=False)


def test_zero_shot_prompts_and_cosine_logits(tmp_path):
    colours = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    paths = [write_solid_clip(tmp_path / f"{name}.mp4", rgb) for name, rgb in colours.items()]
    tokenizer = ColourTokenizer()
    model = ColourEmbedder()
    zs = ZeroShotClassifier(model, tokenizer, ["red", "green", "blue"], templates=("a video of {label}.", "{label}!"))
    assert tokenizer.prompts == ["a video of red.", "red!", "a video of green.", "green!", "a video of blue.", "blue!"]
    assert zs.logit_scale == pytest.approx(math.exp(2.0))
    results = classify(zs, paths, topk=3, num_frames=4, image_size=16, progress=False)
    assert [r.labels[0] for r in results] == ["red", "green", "blue"]
    # logits = scale * cos(mean RGB of the normalised clip, colour axis)
    clip = build_clip_transform(False, 16)(__import__("video").open_video(paths[0]).get_frames([0, 2, 4, 6]))
    v = torch.nn.functional.normalize(clip.mean(dim=(0, 2, 3)), dim=0)
    assert torch.allclose(zs.classify_video(clip[None])[0], math.exp(2.0) * v, atol=1e-5)
    with pytest.raises(ValueError, match="{label}"):  # a template must name the class somewhere
        ZeroShotClassifier(model, tokenizer, ["red"], templates=("a video of something",))
    ZeroShotClassifier(model, tokenizer, ["red"], templates=("a video of {}", "a clip of {c}"))  # open_clip / CLIP_benchmark styles
    with pytest.raises(TypeError, match="encode_video"):
        ZeroShotClassifier(BlueLevelClassifier([0.0]), tokenizer, ["red"])


def test_image_text_model_gets_frame_mean_video_embedding():
    from video.zeroshot import FrameMeanVideoModel, as_video_text_model

    class ImageOnly(torch.nn.Module):  # open_clip-like: encode_image + encode_text
        def encode_image(self, images):
            return images.mean(dim=(2, 3))

        def encode_text(self, tokens):
            return torch.eye(3)[tokens[:, 0]]

    wrapped = as_video_text_model(ImageOnly())
    assert isinstance(wrapped, FrameMeanVideoModel)
    clips = torch.rand(2, 4, 3, 5, 5)
    per_frame = torch.nn.functional.normalize(clips.mean(dim=(3, 4)), dim=-1)  # (B,T,3)
    expect = torch.nn.functional.normalize(per_frame.mean(1), dim=-1)
    assert torch.allclose(wrapped.encode_video(clips), expect, atol=1e-6)
    embedder = ColourEmbedder()
    assert as_video_text_model(embedder) is embedder
    with pytest.raises(TypeError, match="neither encode_video nor encode_image"):
        FrameMeanVideoModel(torch.nn.Linear(2, 2))


def test_latin1_file_and_class_names_give_valid_json(tmp_path):
    """Names from a Latin-1 disk (bytes that are not UTF-8) reach every JSON writer of the pipeline and the CLI."""
    import os

    from retrieval.names import json_text

    root = tmp_path / "videos"
    latin_class, latin_file = os.fsdecode(b"caf\xe9"), os.fsdecode(b"cr\xe8me.mp4")  # lone surrogates in str
    (root / "plain").mkdir(parents=True)
    (root / latin_class).mkdir()
    write_clip(root / "plain" / "a.mp4", num_frames=16, blue=0)
    write_clip(tmp_path / "tmp.mp4", num_frames=16, blue=255)
    os.rename(tmp_path / "tmp.mp4", root / latin_class / latin_file)
    assert os.fsencode(root / latin_class / latin_file).endswith(b"caf\xe9/cr\xe8me.mp4")
    ds = VideoFolder(root, num_frames=4, sampling="tsn", transform=identity())
    assert ds.classes == [latin_class, "plain"]
    out = tmp_path / "eval"
    result = evaluate(BlueLevelClassifier([1.0, 0.0]), ds, batch_size=2, num_workers=0, out_dir=out, progress=False)
    assert result.num_evaluated == 2 and result.top1 == 1.0
    for name in ("metrics.json", "classes.json", "confusion.json", "predictions.jsonl"):
        (out / name).read_bytes().decode("utf-8")  # valid UTF-8 text
    assert json.loads((out / "classes.json").read_text(encoding="utf-8")) == {latin_class: 0, "plain": 1}
    assert json.loads((out / "confusion.json").read_text(encoding="utf-8"))["classes"] == [latin_class, "plain"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    paths = {p["path"] for p in preds}
    assert str(root / latin_class / latin_file) in paths  # the same str: it opens the file again
    assert os.path.isfile(next(p for p in paths if latin_file in p))
    assert (out / "confusion.png").is_file()
    # what `ernie-vl classify --json` prints: valid JSON that encodes as UTF-8, same names back
    results = classify(BlueLevelClassifier([1.0, 0.0]), [root / latin_class / latin_file], class_names=["x", "y"],
                       num_frames=4, transform=identity(), progress=False)
    text = json_text([r.__dict__ for r in results], indent=2)
    text.encode("utf-8")
    assert json.loads(text)[0]["path"] == str(root / latin_class / latin_file)
