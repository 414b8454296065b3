"""Each script in examples/ runs as documented, at a reduced size, against the (reduced) demo's outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _demo_run import demo_run, load_example


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out, _ = demo_run(tmp_path_factory)
    return out


def test_image_text_search(demo, tmp_path):
    from ernie_vl import ErnieVL
    from retrieval import embed_texts
    from retrieval.images import load_image

    ex = load_example("image_text_search")
    images = demo / "data/shapes/images/heldout"
    args = [str(demo / "model"), str(images), "--index", str(tmp_path / "idx"), "--query", "a large red circle",
            "--image-query", str(demo / "data/shapes/images/val/val_000000.png"), "-k", "3",
            "--gallery", str(tmp_path / "hits.png")]
    first = ex.main(args)
    assert first["count"] == 24 and first["update"].added == 24
    assert (tmp_path / "hits.png").stat().st_size > 1000
    hits = first["queries"]["a large red circle"]
    assert [h.rank for h in hits] == [0, 1, 2]
    model = ErnieVL.from_pretrained(demo / "model").eval()
    query = torch.from_numpy(embed_texts(model, ["a large red circle"]))[0]
    with torch.inference_mode():
        best = model.encode_image(model.preprocess(load_image(images / hits[0].metadata["path"]))[None])[0]
    assert hits[0].score == pytest.approx(float(best @ query), abs=1e-4)
    again = ex.main(args)  # the index exists now: nothing is embedded twice
    assert again["update"].added == 0 and again["update"].unchanged == 24
    assert [h.id for h in again["queries"]["a large red circle"]] == [h.id for h in hits]


def test_video_classification(demo, tmp_path, capsys):
    ex = load_example("video_classification")
    out = tmp_path / "eval"
    summary = ex.main([str(demo / "model"), str(demo / "data/motion/val"), "--out", str(out), "--limit", "1",
                       "--show", "2"])
    assert summary["videos"] == 8 and summary["failed"] == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8
    assert summary["top1"] == pytest.approx(np.mean([p["label"] == p["predicted"] for p in predictions]))
    assert (out / "confusion.png").is_file()
    printed = capsys.readouterr().out
    assert printed.count(".mp4: ") == 2
    zero_shot = ex.main([str(demo / "model"), str(demo / "data/motion/val"), "--out", str(tmp_path / "zs"),
                         "--limit", "1", "--show", "1", "--zero-shot"])
    assert zero_shot["zero_shot"] is True and 0.0 <= zero_shot["top1"] <= zero_shot["top5"] <= 1.0


def test_train_custom(demo, tmp_path):
    from ernie_vl import ErnieVL

    ex = load_example("train_custom")
    data = demo / "data"
    figures = ex.main(["--pairs", str(data / "shapes/train.csv"), "--videos", str(data / "motion/train"),
                       "--val-pairs", str(data / "shapes/heldout.csv"), "--val-videos", str(data / "motion/val"),
                       "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-pairs", "8",
                       "--batch-videos", "4", "--minutes", "10"])
    assert figures["steps"] == 2
    for key in ("text_to_image_R@1", "image_to_text_R@10", "video_top1", "video_top5"):
        assert 0.0 <= figures[key] <= 1.0
    assert figures["text_to_image_R@1"] <= figures["text_to_image_R@10"]
    model = ErnieVL.from_pretrained(figures["final_dir"])
    assert model.class_names == sorted(p.name for p in (data / "motion/train").iterdir() if p.is_dir())


def test_from_open_clip(demo, tmp_path):
    import open_clip

    config_dir = tmp_path / "clip_config"
    config_dir.mkdir()
    (config_dir / "demo-test-clip.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(config_dir)
    ex = load_example("from_open_clip")
    summary = ex.main(["--arch", "demo-test-clip", "--experts", "4", "--images",
                       str(demo / "data/shapes/images/heldout"), "--out", str(tmp_path / "clip-moe"),
                       "--query", "a large red circle"])
    assert summary["text_max_abs_diff"] < 1e-5 and summary["image_max_abs_diff"] < 1e-5
    assert summary["int8_min_cosine"] > 0.99 and summary["int8_size_ratio"] < 0.5
    assert summary["indexed"] == 24 and len(summary["hits"]) == 3
    scores = [h["score"] for h in summary["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "clip-moe/int8/config.json").is_file()
