"""bench/digits_validation.py's table: runs grouped by setting, mean and spread over seeds, summary rows."""
from __future__ import annotations

import json

from _bench_helpers import load_bench


def _run(steps, seed, layers, ema=None):
    return {"steps": steps, "seed": seed, "batch": 64, "lr": 1e-3, "warmup": None, "min_lr_ratio": None, "ema": ema,
            "crop": 0.85, "rotate": 5.0, "zero_shot": 0.9, "layers": layers, "layers_wd0.1": 0.95, "embedding": 0.93,
            "pixels_logreg": 0.978, "n_val": 270, "load": [1.0, 2.0]}


def test_table_groups_seeds_and_reports_spread(tmp_path):
    dv = load_bench("digits_validation")
    log = tmp_path / "rows.jsonl"
    runs = [_run(2000, 0, 0.96), _run(1000, 0, 0.94), _run(2000, 1, 0.97), _run(2000, 2, 0.98), _run(2000, 0, 0.5, 0.998)]
    log.write_text("".join(json.dumps(r) + "\n" for r in runs))
    text = dv.write_table(log, tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| 2000 ")]
    assert len(rows) == 2  # EMA on and off are separate settings
    plain = next(r for r in rows if "| off |" in r)
    assert "| 0, 1, 2 |" in plain and "0.970 ± 0.010 (0.960-0.980)" in plain  # mean ± sample sd (min-max)
    assert plain.endswith("| +0.0 |")  # the reference itself
    assert next(r for r in rows if "| 0.998 |" in r).endswith("| -47.0 |")  # (0.5 - 0.97) / 0.01
    assert "| 0.500 |" in next(r for r in rows if "| 0.998 |" in r)
    record = json.loads((tmp_path / "digits_validation.json").read_text())
    assert [v["measured"] for v in record["verdicts"]] == [("0.970 ± 0.010 (0.960-0.980) vs LogisticRegression "
                                                            "0.978 ± 0.000 (0.978-0.978)")]  # only >= 3 seeds
    assert "one digit = 0.37 points" in text and (tmp_path / "digits_validation.md").read_text().startswith("# Digits")


def test_loss_settings_are_separate_rows_and_old_rows_count_as_plain_clip(tmp_path):
    """Rows logged before --contrastive / --caption-positives existed were trained with plain CLIP pairs."""
    dv = load_bench("digits_validation")
    log = tmp_path / "rows.jsonl"
    new = [dict(_run(2000, s, 0.96), contrastive="clip", caption_positives=True) for s in (0, 1)]
    siglip = dict(_run(2000, 0, 0.99), contrastive="siglip", caption_positives=True)
    old_style = [_run(2000, 0, 0.95), dict(_run(2000, 1, 0.97), contrastive="clip", caption_positives=False)]
    log.write_text("".join(json.dumps(r) + "\n" for r in [*new, siglip, *old_style]))
    rows = [line for line in dv.write_table(log, tmp_path).splitlines() if line.startswith("| 2000 ")]
    assert len(rows) == 3
    assert "| clip, negatives | 0, 1 |" in next(r for r in rows if "0.960 ± 0.014 (0.950-0.970)" in r)
    assert "| clip, positives | 0, 1 |" in next(r for r in rows if "| 0.960 ± 0.000" in r)
    assert "| siglip, positives | 0 |" in next(r for r in rows if "| 0.990 |" in r)


def test_preset_changes_are_separate_rows_named_in_the_table(tmp_path):
    """A run with --override is its own setting; rows logged before the option existed used tiny as it is."""
    dv = load_bench("digits_validation")
    log = tmp_path / "rows.jsonl"
    stem = json.dumps({"image_encoder": {"conv_stem": [16, 32, 64]}}, sort_keys=True)
    runs = [_run(2000, 0, 0.95), dict(_run(2000, 1, 0.97), overrides=None), dict(_run(2000, 0, 0.99), overrides=stem)]
    log.write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = [line for line in dv.write_table(log, tmp_path).splitlines() if line.startswith("| 2000 ")]
    assert len(rows) == 2
    assert "0.960 ± 0.014" in next(r for r in rows if r.startswith("| 2000 | linear | none | crops 0.85-1, rotations 5 "))
    assert "| 0.990 |" in next(r for r in rows if r.startswith("| 2000 | conv [16, 32, 64] | none |"))


def test_rows_group_by_the_image_tokens_they_ran_with(tmp_path):
    """A row that records its image tokens groups with an older row whose --override asked for the same
    tokenizer; other changes stay their own setting; no augmentation reads "none"."""
    dv = load_bench("digits_validation")
    log = tmp_path / "rows.jsonl"
    asked = json.dumps({"image_encoder": {"conv_stem": [16, 32, 64]}}, sort_keys=True)
    siglip = json.dumps({"image_encoder": {"conv_stem": [16, 32, 64]}, "loss": {"contrastive": "siglip"}})
    runs = [dict(_run(2000, 0, 0.99), overrides=asked), dict(_run(2000, 1, 0.97), image_stem="conv [16, 32, 64]"),
            dict(_run(2000, 0, 0.95), overrides=siglip), dict(_run(2000, 0, 0.91), crop=1.0, rotate=0.0)]
    log.write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = [line for line in dv.write_table(log, tmp_path).splitlines() if line.startswith("| 2000 ")]
    assert len(rows) == 3
    assert "| 0, 1 |" in next(r for r in rows if r.startswith("| 2000 | conv [16, 32, 64] | none |"))
    assert next(r for r in rows if '`{"loss": {"contrastive": "siglip"}}`' in r).startswith("| 2000 | conv [16, 32, 64] |")
    assert next(r for r in rows if "| 0.910 |" in r).startswith("| 2000 | linear | none | none |")
