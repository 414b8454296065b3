"""``ernie-vl demo`` end to end at a reduced size: every stage, the figures, the report, the checkpoint, resume."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _demo_run import demo_run, small_config

STAGES = ["data", "train", "retrieval", "actions", "search", "classify", "quantize", "figures"]
PNGS = ["training_curves.png", "gallery.png", "confusion_matrix.png", "expert_usage.png", "results.png"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return demo_run(tmp_path_factory)


def test_every_stage_finishes_and_writes_its_files(run):
    out, report = run
    assert [s["name"] for s in report["stages"]] == STAGES
    assert {s["name"]: s["status"] for s in report["stages"]} == {n: "done" for n in STAGES}, \
        [(s["name"], s["error"]) for s in report["stages"] if s["error"]]
    for name in PNGS:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "index" / "manifest.json").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["headline"] == pytest.approx(report["headline"])
    assert report["results"]["train"]["steps"] == 6


def test_training_curves_read_the_real_trainer_log(run):
    from ernie_vl.app.demo import plots

    out, _ = run
    panels = dict(plots.curve_panels(plots.read_jsonl(out / "train/log.jsonl")))
    assert panels["loss"][0] == "loss" and len(panels["loss"]) >= 3  # the total and its parts
    assert any("R@1" in k for k in panels["held-out"]) and panels["lr"] == ["lr"]


def test_report_html_embeds_every_figure(run):
    out, report = run
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(PNGS)
    for stage in report["stages"]:
        assert stage["title"] in html
    assert "ernie-vl search" in html


def test_retrieval_figures_match_a_recomputation_from_the_checkpoint(run):
    from ernie_vl import ErnieVL
    from retrieval import ImageTextCSV, embed_images, embed_texts, recall_at_k

    out, report = run
    model = ErnieVL.from_pretrained(out / "model").eval()
    data = ImageTextCSV(out / "data/shapes/heldout.csv", transform=None)
    images = embed_images(model, data.image_paths, progress=False).embeddings
    expected = recall_at_k(images, embed_texts(model, data.captions), data.text_to_image)
    held = report["results"]["retrieval"]["heldout"]
    for key, value in expected.items():
        assert held[key] == pytest.approx(value, abs=1e-6), key
    assert held["num_images"] == 24 and held["chance_R@1"] == pytest.approx(1 / 24)


def test_action_figures_agree_with_the_confusion_matrix(run):
    out, report = run
    actions = report["results"]["actions"]
    confusion = np.array(actions["confusion_matrix"])
    assert confusion.shape == (8, 8) and confusion.sum() == 16  # 8 classes x 2 validation clips
    assert actions["supervised"]["top1"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert actions["supervised"]["top1"] <= actions["supervised"]["top5"] <= 1.0
    assert 0.0 <= actions["zero_shot"]["top1"] <= actions["zero_shot"]["top5"] <= 1.0
    saved = json.loads((out / "actions/supervised/confusion.json").read_text())
    assert saved["counts"] == actions["confusion_matrix"]


def test_search_results_are_real_hits_of_the_index(run):
    from ernie_vl import ErnieVL
    from retrieval import embed_texts

    out, report = run
    search = report["results"]["search"]
    assert search["indexed_images"] == 24 and len(search["queries"]) == 2 + 1 + 1  # 2 held-out, 1 free, 1 image
    model = ErnieVL.from_pretrained(out / "model").eval()
    first = search["queries"][0]
    assert first["rank_of_true_image"] >= 1 and len(first["hits"]) == 3
    query = torch.from_numpy(embed_texts(model, [first["query"]]))[0]
    for hit in first["hits"]:
        image = model.preprocess(Image.open(out / hit["path"]).convert("RGB"))[None]
        with torch.inference_mode():
            score = float(model.encode_image(image)[0] @ query)
        assert hit["score"] == pytest.approx(score, abs=1e-4)
    scores = [h["score"] for h in first["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_quantization_stage_reports_real_agreement(run):
    _, report = run
    quant = report["results"]["quantize"]
    assert 0.2 < quant["agreement"]["size_ratio"] < 0.5
    assert quant["agreement"]["image_embedding_cosine"] > 0.95
    assert 0.0 <= quant["agreement"]["top1_agreement"] <= 1.0
    assert quant["size_bytes"]["int8"] < quant["size_bytes"]["fp32"]


def test_checkpoint_and_index_work_with_the_cli(run, capsys):
    from ernie_vl.app.cli import main

    out, report = run
    assert main(["search", str(out / "index"), "a large red circle", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 2 and (out / "data/shapes/images/heldout" / hits[0]["metadata"]["path"]).is_file()
    clip = out / report["results"]["classify"]["videos"][0]["path"]
    assert main(["classify", str(out / "model"), str(clip), "--topk", "2"]) == 0
    printed = capsys.readouterr().out
    assert report["results"]["classify"]["videos"][0]["predictions"][0][0] in printed


def test_rerun_reuses_every_finished_stage(run):
    from ernie_vl.app.demo import run_demo

    out, _ = run
    log_before = (out / "train/log.jsonl").read_text()
    report = run_demo(small_config(out), log=lambda m: None, print_summary=False)
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {**{n: "cached" for n in STAGES}, "figures": "done"}
    assert (out / "train/log.jsonl").read_text() == log_before  # no training step was taken


def test_interrupted_training_resumes_and_a_failing_stage_is_reported(run, monkeypatch, tmp_path):
    from ernie_vl.app.demo import pipeline, run_demo

    src, _ = run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    # as if the demo stopped during training: the resume state is there, the stage never finished
    state = json.loads((out / "demo_state.json").read_text())
    for name in STAGES[1:]:
        state["stages"].pop(name)
    (out / "demo_state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "model")

    def broken(ws, ctx):
        raise RuntimeError("decoder on fire")

    def no_moe(ws, ctx):
        raise ValueError("no MoE layer")

    monkeypatch.setattr(pipeline, "classify_videos", broken)
    monkeypatch.setattr(pipeline, "_expert_usage", no_moe)
    report = run_demo(small_config(out), log=lambda m: None, print_summary=False)
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status["data"] == "cached" and status["train"] == "done" and status["classify"] == "failed"
    assert all(status[n] == "done" for n in ("retrieval", "actions", "search", "quantize", "figures"))
    train = report["results"]["train"]
    assert train["resumed"] is True and train["steps"] == 6
    failed = next(s for s in report["stages"] if s["name"] == "classify")
    assert failed["error"] == "RuntimeError: decoder on fire"
    assert "decoder on fire" in (out / "report.html").read_text()
    # a figure that cannot be drawn is noted, and its stale PNG from the first run is not shown
    figures = next(s for s in report["stages"] if s["name"] == "figures")
    assert figures["note"] == "expert_usage.png: ValueError: no MoE layer"
    assert "expert_usage.png" not in report["figures"].values() and (out / "expert_usage.png").exists()
    assert "training_curves.png" in report["figures"].values()


def test_cli_refuses_bad_minutes(capsys, tmp_path):
    from ernie_vl.app.cli import main

    assert main(["demo", "--out", str(tmp_path), "--minutes", "-1"]) == 2
    assert "--minutes must be > 0, got -1.0" in capsys.readouterr().err
