"""Where an inflated video stem's frame-difference weights start (``diff_init``): the pixels' weights by default,
everywhere (``encoders.convert``, ``ernie_vl.inflate``, the trainer and its CLI), zero on request; what a run
records of it (``setup.json``) and how ``--resume`` checks it."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import ernie_vl
from _train_helpers import make_tiny_data, tiny_config
from encoders.convert import DEFAULT_DIFF_INIT, DIFF_INITS
from ernie_vl.train import TrainConfig, train
from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train.run_settings import FINGERPRINT_KEY, inflates, train_fingerprint
from ernie_vl.train.trainer import Trainer

STEMS = {"image_encoder": {"conv_stem": [4, 8]},
         "video_encoder": {"conv_stem": {"channels": [4], "frame_diff": True}}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pre(data, tmp_path_factory):
    """A checkpoint trained one step on pairs only, with conv tokenizers in both encoders."""
    return train(tiny_config(data, tmp_path_factory.mktemp("pre") / "run", max_steps=1, videos=[],
                             model_overrides=STEMS)).final_dir


def _diff_weights(video_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    first = video_encoder.stem[0].weight  # (C, 6, kt, 3, 3): pixels, then their differences
    return first[:, :3], first[:, 3:]


def test_the_default_start_is_the_pixels_weights_and_zero_stays_reachable():
    from ernie_vl.inflate import inflate_video_from_image

    assert DEFAULT_DIFF_INIT == "pixels" and set(DIFF_INITS) == {"zero", "pixels"}
    assert TrainConfig(out="x", pairs=["a.csv"], max_steps=1).video_diff_init == DEFAULT_DIFF_INIT
    torch.manual_seed(0)
    model = ernie_vl.create_model("test", **STEMS)
    pixels, diffs = _diff_weights(inflate_video_from_image(model).video_encoder)
    assert torch.count_nonzero(pixels) > 0 and torch.equal(diffs, pixels)
    pixels, diffs = _diff_weights(inflate_video_from_image(model, diff_init="zero").video_encoder)
    assert torch.count_nonzero(pixels) > 0 and torch.count_nonzero(diffs) == 0
    with pytest.raises(ValueError, match=r"unknown video_diff_init 'random'; valid: \['zero', 'pixels'\]"):
        TrainConfig(out="x", pairs=["a.csv"], max_steps=1, video_diff_init="random")


def test_the_cli_flag_maps_onto_the_config():
    from ernie_vl.train.arguments import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    assert config_from_args(p.parse_args(["--out", "o", "--pairs", "a.csv", "--max-steps", "1"])).video_diff_init == "pixels"
    assert config_from_args(p.parse_args(["--out", "o", "--pairs", "a.csv", "--max-steps", "1", "--video-diff-init", "zero"])).video_diff_init == "zero"
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "o", "--video-diff-init", "random"])


def test_the_trainer_inflates_with_the_setting_and_records_it(data, pre, tmp_path):
    runs = {}
    for init in ("pixels", "zero"):
        trainer = Trainer(tiny_config(data, tmp_path / init, model=str(pre), max_steps=1, video_init="image",
                                      **({} if init == "pixels" else {"video_diff_init": init})))
        runs[init] = _diff_weights(trainer.model.video_encoder)
        setup = json.loads((tmp_path / init / "setup.json").read_text())
        assert setup["video_init"] == "inflated from the image encoder" and setup["video_diff_init"] == init
        trainer.log_file.close()
    assert torch.equal(runs["pixels"][1], runs["pixels"][0]) and torch.count_nonzero(runs["pixels"][1]) > 0
    assert torch.equal(runs["zero"][0], runs["pixels"][0]) and torch.count_nonzero(runs["zero"][1]) == 0
    kept = Trainer(tiny_config(data, tmp_path / "auto", model=str(pre), max_steps=1))  # auto keeps a stem
    assert "video_diff_init" not in json.loads((tmp_path / "auto" / "setup.json").read_text())
    kept.log_file.close()


def test_the_fingerprint_records_the_start_only_where_the_run_inflates(data, pre, tmp_path):
    def fp(**kw):
        cfg = tiny_config(data, tmp_path / "fp", model=str(pre), **kw)
        return inflates(cfg), train_fingerprint(cfg)["video_diff_init"]

    assert fp(video_init="image") == (True, "pixels")
    assert fp(video_init="image", video_diff_init="zero") == (True, "zero")
    assert fp(video_init="keep") == (False, None)
    assert fp() == (False, None)  # auto keeps the checkpoint's video stem
    assert fp(video_init="image", videos=[]) == (False, None)  # nothing to inflate for
    assert inflates(tiny_config(data, tmp_path / "fp", video_init="image")) is False  # a preset: a new model


def _saved_run(data, pre, out, **kw):
    train(tiny_config(data, out, model=str(pre), max_steps=4, checkpoint_minutes=0, **kw), stop_after=1)
    return out


def _forget_diff_init(out) -> None:
    """The state as a run saved before ``video_diff_init`` was recorded."""
    state = ckpt.load_training_state(out)
    del state[FINGERPRINT_KEY]["video_diff_init"]
    ckpt.save_training_state(out, state)


def test_resume_refuses_another_start_and_reads_an_older_inflated_run_as_zero(data, pre, tmp_path):
    run = _saved_run(data, pre, tmp_path / "image", video_init="image")
    resume = dict(model=str(pre), max_steps=4, checkpoint_minutes=0, video_init="image", resume=True)
    with pytest.raises(ValueError, match="video_diff_init 'pixels' then, 'zero' now"):
        Trainer(tiny_config(data, run, **resume, video_diff_init="zero"))
    _forget_diff_init(run)  # inflation started the differences at zero before the setting existed
    with pytest.raises(ValueError, match="video_diff_init 'zero' then, 'pixels' now"):
        Trainer(tiny_config(data, run, **resume))
    trainer = Trainer(tiny_config(data, run, **resume, video_diff_init="zero"))
    assert trainer.step == 1 and json.loads((run / "setup.json").read_text())["video_diff_init"] == "zero"
    trainer.log_file.close()


def test_an_older_run_that_kept_its_video_path_resumes_whatever_the_setting(data, pre, tmp_path):
    run = _saved_run(data, pre, tmp_path / "keep", video_init="keep")
    _forget_diff_init(run)
    resume = dict(model=str(pre), max_steps=4, checkpoint_minutes=0, video_init="keep", resume=True)
    for init in DIFF_INITS:
        trainer = Trainer(tiny_config(data, run, **resume, video_diff_init=init))
        assert trainer.step == 1
        trainer.log_file.close()
