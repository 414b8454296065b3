"""Training on a labelled set captioned from its labels (every caption repeats in a batch): identical
captions are positives of each other; the setting reaches the model, the log and the saved config, and
a run resumes exactly."""
from __future__ import annotations

import argparse
import csv
import json

import pytest
from safetensors.torch import load_file

from _train_helpers import make_tiny_data, read_log, spawn_ranks, tiny_config
from ernie_vl.train import train
from ernie_vl.train.arguments import add_train_arguments, config_from_args

SIGLIP = {"loss": {"contrastive": "siglip", "init_logit_scale": 10.0}}  # where the choice changes the gradient


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic shapes, recaptioned with 3 class captions: a batch of 4 always repeats one."""
    root = tmp_path_factory.mktemp("data")
    data = make_tiny_data(root)
    with open(data["pairs"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labelled = data["pairs"].with_name("labelled.csv")
    with open(labelled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption"])
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"filepath": row["filepath"], "caption": f"a photo of class {i % 3}"})
    return {**data, "pairs": labelled}


def _config(data, out, **kw):
    kw = {"videos": [], "batch_pairs": 4, "max_steps": 12, "model_overrides": SIGLIP, "caption_positives": True, **kw}
    return tiny_config(data, out, **kw)


def test_repeated_captions_resume_exactly(data, tmp_path):
    """6 steps + resume + 6 steps == 12 steps with the grouped loss (losses and every weight to 1e-6)."""
    full = train(_config(data, tmp_path / "full"))
    part = train(_config(data, tmp_path / "part"), stop_after=6)
    assert part.steps == 6
    rest = train(_config(data, tmp_path / "part", resume=True))
    assert full.steps == rest.steps == 12
    log_full, log_part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in log_part] == list(range(1, 13))
    for a, b in zip(log_full, log_part):
        assert a["image_text"] == pytest.approx(b["image_text"], abs=1e-6, rel=0), a["step"]
    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= 1e-6
    assert json.loads((tmp_path / "full" / "setup.json").read_text())["caption_positives"] is True
    saved = json.loads((tmp_path / "full" / "final" / "config.json").read_text())
    assert saved["loss"]["caption_positives"] is True


def test_two_gloo_ranks_match_one_process(data, tmp_path):
    """Copies of a caption on different ranks are positives too: 2 ranks x 2 pairs == 1 process x 4 pairs
    (the MoE balance loss, computed per rank by design, off)."""
    overrides = {"loss": {**SIGLIP["loss"], "aux_weight": 0.0}}
    train(_config(data, tmp_path / "one", max_steps=3, model_overrides=overrides))
    spawn_ranks(_config(data, tmp_path / "two", max_steps=3, model_overrides=overrides), 2, timeout=240)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["image_text"] == pytest.approx(a["image_text"], abs=2e-4, rel=2e-4), a["step"]
    wa = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3


def test_plain_pairs_by_default_and_the_flag_turns_it_on(data, tmp_path):
    """By default (and with --no-caption-positives) the first step's loss (same weights, same batch) is
    SigLIP's plain pairs; --caption-positives changes it."""
    on = train(_config(data, tmp_path / "on"), stop_after=1)
    off = train(_config(data, tmp_path / "off", caption_positives=None), stop_after=1)
    assert on.steps == off.steps == 1
    first_on, first_off = read_log(tmp_path / "on")[0], read_log(tmp_path / "off")[0]
    assert abs(first_on["image_text"] - first_off["image_text"]) > 1e-3
    assert json.loads((tmp_path / "off" / "setup.json").read_text())["caption_positives"] is False


@pytest.mark.parametrize("flags, expected", [([], None), (["--caption-positives"], True),
                                             (["--no-caption-positives"], False)])
def test_cli_flag(flags, expected):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args(["--out", "x", "--pairs", "a.csv", "--max-steps", "1", *flags]))
    assert cfg.caption_positives is expected
