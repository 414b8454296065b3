"""The few-shot bench's rows that start from a pair-trained ``tiny`` (``pairs_keep`` / ``pairs_image``): the
cached pair stage, what each row records, the check of ``--video-init auto``'s rule, and the cost bench that
explains the per-step time of the inflated video path."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

import _pair_start  # noqa: E402
import few_shot_video as bench  # noqa: E402


def _row(variant, seed, top1, steps=600, pair_steps=400, **extra):
    start = {"from": "pairs", "pair_stage": {"steps": pair_steps, "seed": seed}, "video_init": (
        "inflated from the image encoder" if variant in ("pairs_image", "pairs_image_zero") else
        "kept from the checkpoint")}
    return {"clips": 40, "variant": variant, "seed": seed, "top1": top1, "zeroshot_top1": top1, "steps": steps,
            "train_s": steps / 10, "budget": {"minutes": None, "steps": steps}, "load": [1.0, 1.0], "setup": {},
            "written": "2026-01-01 00:00 UTC", "start": start, **extra}


def _rule(rows):
    return bench.auto_rule_verdict(rows)


def test_the_auto_rule_needs_keep_above_image_on_two_seeds_at_one_budget():
    assert _rule([_row("full", 0, 0.9)]) is None  # no pairs rows: no verdict
    both = [_row("pairs_keep", 0, 0.91), _row("pairs_image", 0, 0.24), _row("pairs_keep", 1, 0.88),
            _row("pairs_image", 1, 0.30)]
    v = _rule(both)
    assert v.met is True and v.goal == "keep > image on each of >= 2 seeds"
    assert v.measured == ("seed 0: keep 0.910, image 0.240 (600 / 600 steps); "
                          "seed 1: keep 0.880, image 0.300 (600 / 600 steps)")
    assert _rule(both[:3]).met is False and "fewer than two seeds" in _rule(both[:3]).measured
    third = both + [_row("pairs_keep", 2, 0.85), _row("pairs_image", 2, 0.87)]
    assert _rule(third).met is False and "seed 2: keep 0.850, image 0.870" in _rule(third).measured  # every seed
    flipped = both[:3] + [_row("pairs_image", 1, 0.95)]
    assert _rule(flipped).met is False
    tie = both[:3] + [_row("pairs_image", 1, 0.88)]
    assert _rule(tie).met is False  # the rule needs keep strictly above
    other_budget = both[:3] + [_row("pairs_image", 1, 0.30, steps=1500)]
    assert _rule(other_budget).met is False and "seed 1" not in _rule(other_budget).measured
    other_stage = both[:3] + [_row("pairs_image", 1, 0.30, pair_steps=200)]
    assert _rule(other_stage).met is False
    assert any(x.what == v.what for x in bench.verdicts(both))  # the bench's verdicts carry it
    others = [_row("pairs_image_diff", 0, 0.5), _row("pairs_image_zero", 1, 0.3), _row("pairs_image_zero", 0, 0.2)]
    fix = {x.what: x for x in bench.verdicts(both + others)}
    (fixed,) = [x for k, x in fix.items() if "inflated by the bench" in k]
    assert fixed.met is None and fixed.measured == "seed 0: 0.500 (600 steps)"
    (zero,) = [x for k, x in fix.items() if "--video-diff-init zero" in k]
    assert zero.met is None and zero.measured == "seed 0: 0.200 (600 steps), seed 1: 0.300 (600 steps)"
    assert fix[v.what].measured == v.measured  # neither is one of the rule's rows


def test_pairs_variants_name_the_video_path_each_init_gives():
    from encoders.video_stem import ConvStemConfig
    from ernie_vl.presets import load_config
    from ernie_vl.train.finetune import KEPT_STEM, video_start

    keep, image, full = (bench.expected_encoder(v) for v in ("pairs_keep", "pairs_image", "full"))
    assert keep == full  # the checkpoint's own video encoder: tiny's
    tiny = load_config("tiny")
    assert keep["patch_size"] == list(tiny.video_encoder.patch_size) and keep["cls_mode"] == "shared"
    # inflation: the image encoder's geometry and tokenizer channels; the video stem's frame_diff and time kernel
    assert image["patch_size"] == list(tiny.image_encoder.patch_size) != keep["patch_size"]
    assert image["cls_mode"] == "per_frame" and image["tubelet_size"] == keep["tubelet_size"]
    assert isinstance(tiny.image_encoder.conv_stem, ConvStemConfig)
    assert image["conv_stem"]["channels"] == list(tiny.image_encoder.conv_stem.channels)
    assert image["conv_stem"]["frame_diff"] == keep["conv_stem"]["frame_diff"]
    # auto keeps a pair-trained tiny's video stem, so it is pairs_keep (no row of its own)
    assert video_start("auto", True, {"pairs"}, bool(tiny.video_encoder.conv_stem)) == KEPT_STEM
    assert bench.VARIANTS["pairs_keep"][1]["video_init"] == "keep" and "pairs_auto" not in bench.VARIANTS
    assert bench.describe_encoder(image) == "divided, k=4, p=4, tokenizer [16, 32, 64] + diff, cls per frame"
    assert bench.describe_encoder(keep) == "divided, k=4, p=8, tokenizer [16, 32, 64] + diff, cls shared"


def test_staleness_compares_the_fields_a_row_recorded():
    now = bench.expected_encoder("full")
    old = {k: now[k] for k in ("attention", "tubelet_size", "conv_stem")}  # a row from before patch / cls
    assert not bench.is_stale(_row("full", 0, 0.9, video_encoder=old))
    assert bench.is_stale(_row("full", 0, 0.9, video_encoder=dict(old, tubelet_size=2)))
    assert not bench.is_stale(_row("pairs_image", 0, 0.2, video_encoder=bench.expected_encoder("pairs_image")))
    assert bench.is_stale(_row("pairs_image", 0, 0.2, video_encoder=now))  # ran tiny's own: not an inflation
    assert bench.is_stale(_row("pairs_keep", 0, 0.9, video_encoder=dict(now, patch_size=[4, 4])))


def test_the_table_says_where_each_row_started_and_its_seconds_per_step():
    rows = [_row("pairs_image", 0, 0.24, video_encoder=bench.expected_encoder("pairs_image")),
            _row("full", 0, 0.99, video_encoder=bench.expected_encoder("full"))]
    del rows[1]["start"]  # rows before the pairs rows carry no start: the preset at random init
    # a trainer-inflated row that recorded no diff start ran before --video-diff-init: from zero
    assert bench.describe_start(rows[0]) == "pairs 400 steps, inflated from image, diffs from zero"
    assert bench.describe_start(rows[1]) == "random init"
    rows[0]["start"]["video_diff_init"] = "pixels"
    assert bench.describe_start(rows[0]) == "pairs 400 steps, inflated from image, diffs from pixels"
    assert bench.describe_start(_row("pairs_keep", 0, 0.9)) == "pairs 400 steps, video kept"
    text = bench.markdown(rows, "cmd", SimpleNamespace(line=lambda: "machine"))
    assert "| 40 | pairs_image | divided, k=4, p=4, tokenizer [16, 32, 64] + diff, cls per frame | 0 | 600 | 60.0 | " \
           "0.100 | pairs 400 steps, inflated from image, diffs from pixels | - / 600 |" in text
    assert "| 0 | 600 | 60.0 | 0.100 | random init |" in text
    assert set(bench.LEGEND) == set(bench.VARIANTS)


def test_pairs_rows_share_one_cached_pair_stage_per_seed(tmp_path, monkeypatch):
    from _motion_clips import make_clips

    monkeypatch.setattr(_pair_start, "SHAPES", dict(num_train=48, num_val=16, num_heldout=0, image_size=32))
    monkeypatch.setattr(bench, "make_clips", lambda root, n: make_clips(root, n, val_per_class=1))
    args = SimpleNamespace(work=str(tmp_path), minutes=None, steps=2, batch_videos=4, threads=1, no_progress=True,
                           pair_steps=3)
    keep = bench.run_row(2, "pairs_keep", 0, args)
    stage = tmp_path / "pairs_tiny_3_0"
    weights = (stage / "final" / "model.safetensors").read_bytes()
    image = bench.run_row(2, "pairs_image", 0, args)
    assert (stage / "final" / "model.safetensors").read_bytes() == weights  # reused, not retrained
    assert keep["start"]["pair_stage"] == image["start"]["pair_stage"]
    record = keep["start"]["pair_stage"]
    assert record["steps"] == 3 and record["seed"] == 0 and "48 images" in record["data"]
    assert 0.0 <= record["evaluation"]["text_to_image_R@1"] <= 1.0
    assert keep["start"]["video_init"] == "kept from the checkpoint"
    assert image["start"]["video_init"] == "inflated from the image encoder"
    assert image["start"]["video_diff_init"] == image["setup"]["video_diff_init"] == "pixels"
    assert "video_diff_init" not in keep["start"] and "video_diff_init" not in keep["setup"]
    assert keep["start"]["video_projector"]["num_queries"] == 8 and image["start"]["video_projector"]["num_queries"] == 16
    assert keep["video_encoder"] == bench.expected_encoder("pairs_keep")
    assert image["video_encoder"] == bench.expected_encoder("pairs_image")
    assert keep["steps"] == image["steps"] == 2 and not bench.is_stale(keep) and not bench.is_stale(image)
    fix = bench.run_row(2, "pairs_image_diff", 0, args)
    assert (stage / "final" / "model.safetensors").read_bytes() == weights
    assert fix["start"]["pair_stage"] == record and "diff_init='pixels'" in fix["start"]["inflated"]
    assert fix["video_encoder"] == image["video_encoder"] and not bench.is_stale(fix)
    assert bench.describe_start(fix) == "pairs 3 steps, inflated from image, diffs from pixels"
    zero = bench.run_row(2, "pairs_image_zero", 0, args)
    assert zero["start"]["video_diff_init"] == zero["setup"]["video_diff_init"] == "zero"
    assert zero["video_encoder"] == image["video_encoder"] and not bench.is_stale(zero)
    assert bench.describe_start(zero) == "pairs 3 steps, inflated from image, diffs from zero"
    from ernie_vl.model import ErnieVL

    inflated = ErnieVL.from_pretrained(stage / "final_image_pixels").video_encoder.stem[0].weight
    assert torch.equal(inflated[:, 3:], inflated[:, :3]) and torch.count_nonzero(inflated[:, 3:]) > 0
    other = bench.run_row(2, "pairs_keep", 1, SimpleNamespace(**{**vars(args), "work": str(tmp_path)}))
    assert other["start"]["pair_stage"]["seed"] == 1 and (tmp_path / "pairs_tiny_3_1" / "final").is_dir()
    with pytest.raises(ValueError, match="pair-training steps"):
        _pair_start.pair_checkpoint(tmp_path, 0, 0)


def test_the_cost_bench_counts_the_tokens_each_video_path_sees():
    import video_init_cost as cost

    built = cost.models()
    clips = torch.rand(2, 8, 3, 32, 32)
    keep, image = (cost.geometry(built[k], clips) for k in ("keep", "image"))
    # 8 frames / tubelet 4 = 2 time steps: 4x4 tokens each + 1 shared class token, or 8x8 each + 1 class token each
    assert keep == {"patch_size": [8, 8], "cls_mode": "shared", "encoder_tokens": 2 * 16 + 1, "backbone_video_tokens": 8}
    assert image == {"patch_size": [4, 4], "cls_mode": "per_frame", "encoder_tokens": 2 * 64 + 2,
                     "backbone_video_tokens": 16}
    labels = torch.tensor([0, 1])
    flops = {k: cost.flops_per_clip(cost.train_step("bare", built[k])[1], clips, labels) for k in built}
    assert 2.0 < flops["image"] / flops["keep"] < 4.0  # about the 4x tokens, less the stem's unchanged first blocks
    parts = cost.forward_parts(built["image"], clips)
    assert 0 < parts["stem"] < parts["video encoder"] and parts["projector"] > 0 and parts["backbone"] > 0


def test_rows_run_before_the_pixels_start_are_not_shown_as_pairs_image():
    """The committed rows: those run when ``--video-init image`` started the differences at zero are renamed to
    ``pairs_image_zero`` (still buildable, not stale, listed in the table's notes); every ``pairs_image`` row
    recorded the pixels' start."""
    import json

    rows = json.loads(bench.ROWS_FILE.read_text())
    zero = [r for r in rows if r["variant"] == "pairs_image_zero"]
    assert {r["seed"] for r in zero} >= {0, 1}
    for r in zero:
        assert r["relabelled_from"] == "pairs_image" and "at zero" in r["note"]
        assert bench.diff_start(r) == "zero" and not bench.is_stale(r)
    image = [r for r in rows if r["variant"] == "pairs_image"]
    assert image and all(r["start"]["video_diff_init"] == "pixels" and not bench.is_stale(r) for r in image)
    assert all(r["variant"] in bench.VARIANTS for r in rows)  # every renamed row names a buildable variant
    notes = bench.relabel_notes(rows)
    assert sum("ran as `pairs_image`" in n for n in notes) == len(zero)
    text = bench.markdown(rows, "cmd", SimpleNamespace(line=lambda: "machine"))
    assert "| 40 | pairs_image_zero |" in text and "inflated from image, diffs from zero" in text
