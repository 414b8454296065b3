"""The demo's figures, report.html / report.json and summary table, from made-up inputs."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from ernie_vl.app.demo import plots
from ernie_vl.app.demo.report import format_value, write_report_html, write_report_json
from ernie_vl.app.demo.routing import merge_layer_stats
from ernie_vl.app.demo.summary import format_summary, format_table


def _png_size(path):
    with Image.open(path) as im:
        return im.format, im.size


def _log(steps=60):
    """Records shaped like the trainer's log.jsonl: loss parts at the top level, routing and eval nested."""
    rng = np.random.default_rng(0)
    recs = []
    for s in range(1, steps + 1):
        rec = {"step": s, "lr": 1e-3 * min(1, s / 10), "loss": 3 * np.exp(-s / 20) + 0.1 * rng.random(),
               "image_text": 2 * np.exp(-s / 15), "video_cls": 1.0 / s, "aux": 0.01, "load_balance": 1.0,
               "z_loss": 4.0, "samples": 96, "step_time": 1.2, "samples_per_s": 80.0, "grad_norm": 3.0,
               "routing": {"overlap_rate": 0.5, "activated_param_ratio": 0.5, "router_entropy": 1.2,
                           "usage_by_modality": [[0.5, 0.5]]}}
        if s % 20 == 0:
            rec["eval"] = {"text_to_image_R@1": s / 60, "video_top1": s / 40}
        recs.append(rec)
    return recs


def test_read_jsonl_skips_blank_and_broken_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "loss": 1.5}\n\n{"step": 1, "lo\n[1, 2]\n{"step": 2, "loss": 0.5}\n')
    assert plots.read_jsonl(path) == [{"step": 0, "loss": 1.5}, {"step": 2, "loss": 0.5}]


def test_flatten_keeps_numbers_with_paths():
    flat = plots.flatten({"step": 3, "losses": {"clip": 1.0, "moe": {"z": 2}}, "name": "x", "ok": True})
    assert flat == {"step": 3.0, "losses/clip": 1.0, "losses/moe/z": 2.0}


def test_curve_panels_sort_the_trainer_log():
    panels = dict(plots.curve_panels(_log()))
    assert panels == {
        "loss": ["loss", "image_text", "video_cls"],
        "aux": ["z_loss", "load_balance", "aux"],
        "held-out": ["eval/text_to_image_R@1", "eval/video_top1"],
        "routing": ["routing/overlap_rate", "routing/activated_param_ratio"],
        "lr": ["lr"],
        "speed": ["samples_per_s"],
    }


def test_many_held_out_metrics_are_cut_to_the_r1_and_top1_ones():
    evaluation = {f"{d}_R@{k}": 0.5 for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
    evaluation.update({"video_top1": 0.9, "video_top5": 1.0})
    panels = dict(plots.curve_panels([{"step": 1, "loss": 2.0}, {"step": 2, "eval": evaluation}]))
    assert panels["held-out"] == ["eval/image_to_text_R@1", "eval/text_to_image_R@1", "eval/video_top1"]


def test_training_curves_png(tmp_path):
    out = plots.plot_training_curves(_log(), tmp_path / "curves.png")
    fmt, (w, h) = _png_size(out)
    assert fmt == "PNG" and 1.5 < w / h < 2.5  # six panels in two rows of three
    only_loss = plots.plot_training_curves([{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)],
                                           tmp_path / "one.png")
    _, (w1, h1) = _png_size(only_loss)
    assert w1 < 2 * h1  # one panel
    with pytest.raises(ValueError, match="keys seen"):
        plots.plot_training_curves([{"step": 1, "note": "x"}], tmp_path / "none.png")


def test_usage_matrix_and_heatmap(tmp_path):
    layers = [{"usage_by_modality": [[0.5, 0.5, 0, 0], [0.25] * 4, [0, 0, 0, 0]]},
              {"usage_by_modality": [[1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0]]}]
    usage = plots.usage_matrix(layers)
    assert usage.shape == (2, 3, 4)
    np.testing.assert_allclose(usage[1, 1], [0.1, 0.2, 0.3, 0.4])
    out = plots.plot_expert_usage(usage, tmp_path / "experts.png")
    assert _png_size(out)[0] == "PNG"
    with pytest.raises(ValueError, match="usage_by_modality"):
        plots.usage_matrix([{"tokens_per_expert": [1, 2]}])
    with pytest.raises(ValueError, match="nothing was routed"):
        plots.plot_expert_usage(np.zeros((2, 3, 4)), tmp_path / "zero.png")


def test_merge_layer_stats_averages_only_present_modalities():
    pairs = [{"usage_by_modality": [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]]}]
    videos = [{"usage_by_modality": [[0.0, 0.0], [0.0, 0.0], [0.2, 0.8]]}]
    video_text = [{"usage_by_modality": [[1.0, 0.0], [0.0, 0.0], [0.4, 0.6]]}]
    merged = merge_layer_stats([pairs, videos, video_text])
    np.testing.assert_allclose(merged[0]["usage_by_modality"], [[0.75, 0.25], [1.0, 0.0], [0.3, 0.7]])
    with pytest.raises(ValueError, match="number of MoE layers"):
        merge_layer_stats([pairs, pairs * 2])


def _images(tmp_path, n=4):
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 200, 30)).save(p)
        paths.append(str(p))
    return paths


def test_gallery_png(tmp_path):
    imgs = _images(tmp_path)
    queries = [{"query": "a small red circle", "kind": "text",
                "hits": [{"path": p, "score": 0.9 - i / 10, "caption": "c", "correct": i == 0}
                         for i, p in enumerate(imgs)]},
               {"query": imgs[0], "kind": "image", "image": imgs[0],
                "hits": [{"path": imgs[1], "score": 0.5, "caption": "d", "correct": None}]}]
    out = plots.plot_query_gallery(queries, tmp_path / "gallery.png", max_hits=3)
    fmt, (w, h) = _png_size(out)
    assert fmt == "PNG" and w > h  # 2 rows x 4 columns
    with pytest.raises(ValueError, match="no queries"):
        plots.plot_query_gallery([], tmp_path / "g.png")


def test_metric_bars(tmp_path):
    out = plots.plot_metric_bars({"retrieval": {"R@1": 0.8, "R@5": float("nan")}, "empty": {}}, tmp_path / "b.png")
    assert _png_size(out)[0] == "PNG"
    with pytest.raises(ValueError, match="no finite"):
        plots.plot_metric_bars({"x": {"a": float("nan")}}, tmp_path / "c.png")


def test_format_value():
    assert [format_value(v) for v in (0.812345, 12, 123456, 1e-5, None, True, "x", 2.5e6)] == \
        ["0.8123", "12", "123,456", "1.000e-05", "None", "True", "x", "2.500e+06"]


def test_report_html_is_self_contained_and_escaped(tmp_path):
    imgs = _images(tmp_path, 2)
    fig = plots.plot_metric_bars({"r": {"R@1": 0.5}}, tmp_path / "bars.png")
    report = {
        "title": "demo <test>",
        "stages": [{"name": "a", "title": "A", "status": "done", "seconds": 1.25},
                   {"name": "b", "title": "B", "status": "failed", "seconds": 0.5, "error": "ValueError: <bad>",
                    "traceback": "Traceback ..."}],
        "headline": {"text->image R@1": 0.8125},
        "figures": {"Bars": fig.name, "Gone": "missing.png"},
        "captions": {"Bars": "what it shows <x>"},
        "sections": {"Retrieval": {"heldout": {"text_to_image_R@1": 0.75}, "per": [{"a": 1}, {"b": 2}]}},
        "queries": [{"query": "red <circle>", "kind": "text",
                     "hits": [{"path": imgs[0], "score": 0.9, "caption": "x", "correct": True}]}],
        "videos": [{"path": "v/a.mp4", "label": "grow", "predictions": [["grow", 0.9], ["shrink", 0.1]]}],
        "commands": ["ernie-vl search runs/demo/index \"a red circle\""],
    }
    out = write_report_html(report, tmp_path / "report.html")
    html = out.read_text()
    assert "demo &lt;test&gt;" in html and "ValueError: &lt;bad&gt;" in html and "red &lt;circle&gt;" in html
    assert "<test>" not in html
    # every picture is inline: the figure's exact bytes, and a thumbnail of the hit
    uris = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert base64.b64decode(uris[0]) == fig.read_bytes()
    assert len(uris) == 2 and "src='/" not in html and "missing.png" not in html.split("Gone")[1][:200]
    assert "not produced" in html and "what it shows &lt;x&gt; (<code>bars.png</code>)" in html
    assert "0.8125" in html and "0.75" in html and "&#10003;" in html
    j = write_report_json(report, tmp_path / "report.json")
    assert json.loads(j.read_text())["headline"] == {"text->image R@1": 0.8125}


def test_format_table_aligns_numbers_right():
    table = format_table([["a", 1.5], ["long name", 10]], header=["k", "v"])
    assert table.splitlines() == [
        "+-----------+-----+",
        "| k         |   v |",
        "+===========+=====+",
        "| a         | 1.5 |",
        "| long name |  10 |",
        "+-----------+-----+",
    ]


def test_summary_lists_stages_headline_and_failures():
    text = format_summary({
        "stages": [{"title": "Train", "status": "done", "seconds": 12.34},
                   {"title": "Search", "status": "failed", "seconds": 0.2, "error": "ImportError: " + "x" * 100}],
        "headline": {"R@1": 0.9},
        "files": {"report": "report.html"},
    })
    assert "| Train  | done   |    12.3 |" in text
    assert "ImportError: xxx" in text and "..." in text
    assert "| R@1    |   0.9 |" in text and "report.html" in text
    assert text.endswith("1 stage(s) failed; details in report.html / report.json.")


def test_heatmap_shows_modality_groups_of_an_ernie45_model(tmp_path):
    import torch

    import ernie_vl
    from ernie_vl.model import ErnieVLBatch

    model = ernie_vl.create_model("ernie45-tiny", num_classes=2).eval()
    batch = ErnieVLBatch(images=torch.randn(2, 3, 32, 32), texts=model.tokenizer(["a", "b"]),
                         videos=torch.randn(2, 8, 3, 32, 32), video_labels=torch.tensor([0, 1]))
    with torch.no_grad():
        layers = merge_layer_stats([[s.to_dict() for s in model(batch).routing]])
    assert layers[0]["expert_group"] == [0, 0, 0, 0, 1, 1, 1, 1]
    usage = plots.usage_matrix(layers)
    assert usage[:, 0, 4:].sum() == 0 and usage[:, 1, :4].sum() == 0  # text only in group 0, images in group 1
    out = plots.plot_expert_usage(usage, tmp_path / "groups.png", expert_groups=layers[0]["expert_group"],
                                  group_names=("text", "vision"))
    assert _png_size(out)[0] == "PNG"
    with pytest.raises(ValueError, match=r"one group per expert \(8\), got shape \(4,\)"):
        plots.plot_expert_usage(usage, tmp_path / "bad.png", expert_groups=[0, 0, 1, 1])
