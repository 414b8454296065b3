"""bench/train_digits.py's ``--override``: tiny's preset changed for a run, in its own folder, named in the results."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from _bench_helpers import load_bench

STEM = {"image_encoder": {"conv_stem": [16, 32, 64]}}


class _Stop(Exception):
    """Raised by the stand-in trainer, carrying the config it was given."""


def _run_main(monkeypatch, tmp_path: Path, *argv: str):
    td = load_bench("train_digits")
    import ernie_vl.data.digits as digits
    import ernie_vl.train as train_pkg

    fake = types.SimpleNamespace(csv={"train": tmp_path / "train.csv"})
    monkeypatch.setattr(digits, "make_digits", lambda *a, **k: fake)  # no PNGs written

    def stop(cfg):
        raise _Stop(cfg)

    monkeypatch.setattr(train_pkg, "train", stop)
    monkeypatch.setattr(td, "CACHE", tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_digits.py", *argv])
    with pytest.raises(_Stop) as stopped:
        td.main()
    return stopped.value.args[0]


def test_override_reaches_the_trainer_in_its_own_run_folder(monkeypatch, tmp_path):
    cfg = _run_main(monkeypatch, tmp_path, "--steps", "7", "--override", json.dumps(STEM))
    assert cfg.model == "tiny" and cfg.model_overrides == STEM and cfg.max_steps == 7
    plain = _run_main(monkeypatch, tmp_path, "--steps", "7")
    assert plain.model_overrides == {}
    assert Path(plain.out).name == "run-7-0"  # the folder a run without the option always used (it resumes)
    assert Path(cfg.out).name.startswith("run-7-0-o") and cfg.out != plain.out


def test_override_must_be_a_json_object(monkeypatch, capsys):
    td = load_bench("train_digits")
    monkeypatch.setattr(sys, "argv", ["train_digits.py", "--override", "[16, 32]"])
    with pytest.raises(SystemExit):
        td.main()
    assert "--override must be a JSON object" in capsys.readouterr().err


def test_results_name_the_model():
    td = load_bench("train_digits")
    assert td.model_line(None) == "`tiny`, the preset as it is"
    from encoders.video_stem import ConvStemConfig

    assert td.image_tokens(0) == "the linear patch embedding"
    assert td.image_tokens(ConvStemConfig((16, 32, 64))) == "a conv tokenizer [16, 32, 64]"
    line = td.model_line(STEM)
    assert '`--override {"image_encoder": {"conv_stem": [16, 32, 64]}}`' in line
    assert td.run_name(100, 1, STEM) != td.run_name(100, 1, {"image_encoder": {"conv_stem": [8]}})
