"""Training state without pickle: exact codec, refused pickles, timed checkpoints, honest --resume, cut logs."""
from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from _train_helpers import kill_at, make_tiny_data, read_log, tiny_config
from ernie_vl.train import TrainConfig, train
from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train.state_codec import pack, unpack
from ernie_vl.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


class _Exploit:
    """Unpickling this creates ``marker``: what a crafted run folder would do with a shell command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_exploit(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump({"step": 3, "model": _Exploit(str(marker))}, f)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and  # bitwise: NaN too
                torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, np.random.RandomState):
        return isinstance(b, np.random.RandomState) and _same(a.get_state(), b.get_state())
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_codec_round_trip_is_exact():
    rs = np.random.RandomState(7)
    rs.rand(3)
    state = {
        "step": 12, "lr": 1.0 / 3.0, "odd": [math.nan, math.inf, -math.inf], "none": None, "flag": True,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}},
                      "param_groups": [{"params": [0, 1], "betas": (0.9, 0.98)}]},
        "rng": [{"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}],
        "empty": torch.empty(0, dtype=torch.int64), "bf16": torch.randn(5).to(torch.bfloat16),
        "view": torch.arange(10.0)[2:6], "meter": {"rng": rs, "error_dict": {3: torch.ones(2)}},
        "pending": [(1, 2), (3, 4)], "big": 2**70,
    }
    skeleton, tensors = pack(state)
    back = unpack(skeleton, tensors)
    assert _same(state, back)
    # the restored RNG states really continue the same streams
    random.setstate(back["rng"][0]["python"])
    x = random.random()
    random.setstate(state["rng"][0]["python"])
    assert random.random() == x
    assert back["meter"]["rng"].rand() == rs.rand()


def test_codec_refuses_types_outside_the_allow_list():
    with pytest.raises(TypeError, match=r"state\['model'\].*_Exploit.*allowed"):
        pack({"model": _Exploit("x")})
    with pytest.raises(ValueError, match="unknown node kind 'pickle'"):
        unpack({"pickle": "gASV"}, {})
    with pytest.raises(ValueError, match="does not hold"):
        unpack({"tensor": "t9"}, {})
    with pytest.raises(ValueError, match="dtype"):
        unpack({"ndarray": "t0", "dtype": "|O", "shape": [1]}, {"t0": torch.zeros(8, dtype=torch.uint8)})


def test_state_file_is_safetensors_plus_json(tmp_path):
    from safetensors import safe_open

    rng = np.random.get_state()
    ckpt.save_training_state(tmp_path, {"step": 5, "w": torch.ones(3), "rng": rng})
    path = tmp_path / ckpt.CHECKPOINT_NAME
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON; no pickle opcodes
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ernie_vl_format"] == ckpt.STATE_FORMAT
    state = ckpt.load_training_state(tmp_path)
    assert state["step"] == 5 and torch.equal(state["w"], torch.ones(3))
    assert state["rng"][1].dtype == np.uint32 and _same(state["rng"], rng)


def test_malicious_pickle_state_is_refused_and_never_runs(data, tmp_path):
    # control: the file really runs code when unpickled (what torch.load(weights_only=False) did)
    control = tmp_path / "control.pt"
    _write_exploit(control, tmp_path / "control-ran")
    with open(control, "rb") as f:
        pickle.load(f)
    assert (tmp_path / "control-ran").exists()

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "exploit-ran"
    _write_exploit(run / ckpt.LEGACY_CHECKPOINT_NAME, marker)
    with pytest.raises(ckpt.LegacyStateError, match="old pickle format.*not loaded.*run any code"):
        train(tiny_config(data, run, resume=True))
    with pytest.raises(ckpt.LegacyStateError):
        ckpt.load_training_state(run)
    assert not marker.exists()

    # the same bytes under the new name: not safetensors, refused, nothing runs
    (run / ckpt.LEGACY_CHECKPOINT_NAME).rename(run / ckpt.CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        train(tiny_config(data, run, resume=True))
    assert not marker.exists()


def test_cli_resume_over_a_pickle_state_says_why(data, tmp_path, capsys):
    from ernie_vl.app.cli import main

    marker = tmp_path / "exploit-ran"
    run = tmp_path / "run"
    run.mkdir()
    _write_exploit(run / ckpt.LEGACY_CHECKPOINT_NAME, marker)
    rc = main(["train", "--model", "test", "--pairs", str(data["pairs"]), "--out", str(run), "--max-steps", "2",
               "--batch-pairs", "8", "--num-workers", "0", "--threads", "1", "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "pickle" in err and "new --out" in err
    assert not marker.exists()


def test_atomic_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt.save_training_state(tmp_path, {"step": 1})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        ckpt.save_training_state(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_training_state(tmp_path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT_NAME]  # no temporary left behind
    (tmp_path / ckpt.CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        ckpt.load_training_state(tmp_path)


def test_checkpoints_by_time_are_on_by_default():
    assert TrainConfig.__dataclass_fields__["checkpoint_minutes"].default == 5.0
    from ernie_vl.app.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "x", "--pairs", "a.csv"])
    assert args.checkpoint_minutes == 5.0 and args.checkpoint_every == 0
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        TrainConfig(pairs=["a.csv"], max_steps=1, checkpoint_minutes=-1)


def test_timed_checkpoint_survives_a_kill(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    kill_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, run, max_steps=6, checkpoint_minutes=1e-9))  # "every minute" elapses each step
    assert ckpt.load_training_state(run)["step"] == 4
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "off", max_steps=6, checkpoint_minutes=0))
    assert not ckpt.has_training_state(tmp_path / "off")


def test_resume_after_a_kill_cuts_the_log_and_matches_an_unbroken_run(data, tmp_path, monkeypatch):
    small = dict(max_steps=8, batch_pairs=4, batch_videos=2, checkpoint_minutes=0)
    full = tmp_path / "full"
    train(tiny_config(data, full, **small))
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_at(m, 6)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(data, run, checkpoint_every=3, **small))
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5]
    with open(run / ckpt.LOG_NAME, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "lo')  # a line half written when the process died
    assert ckpt.load_training_state(run)["step"] == 3
    result = train(tiny_config(data, run, resume=True, checkpoint_every=3, **small))
    assert result.steps == 8
    log, reference = read_log(run), read_log(full)
    assert [r["step"] for r in log] == list(range(1, 9))  # steps 4 and 5 are not repeated
    for a, b in zip(reference, log):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0), a["step"]


def test_resume_without_state_warns_and_starts_at_step_0(data, tmp_path):
    with pytest.warns(UserWarning, match="no train_state.safetensors.*starting from step 0"):
        result = train(tiny_config(data, tmp_path / "new", max_steps=2, resume=True))
    assert result.steps == 2 and [r["step"] for r in read_log(tmp_path / "new")] == [1, 2]


def test_resume_refuses_a_run_folder_without_state(data, tmp_path, monkeypatch):
    def no_build(self):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(Trainer, "_build_model", no_build)  # the refusal comes first
    run = tmp_path / "run"
    run.mkdir()
    log = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'
    (run / ckpt.LOG_NAME).write_text(log)
    with pytest.raises(ValueError, match=r"2 logged steps.*no train_state.safetensors.*refusing"):
        train(tiny_config(data, run, resume=True))
    assert (run / ckpt.LOG_NAME).read_text() == log  # nothing overwritten


def test_truncate_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / ckpt.LOG_NAME
    path.write_text("".join(f'{{"step": {s}}}\n' for s in (1, 2, 3, 4)) + "not json\n")
    assert ckpt.truncate_log(path, 2) == 3
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert ckpt.truncate_log(path, 5) == 0 and ckpt.logged_steps(path) == 2


def test_a_legacy_state_you_wrote_converts_and_resumes(data, tmp_path):
    from ernie_vl.train.legacy_state import main as convert

    run = tmp_path / "run"
    train(tiny_config(data, run, max_steps=6, checkpoint_minutes=0), stop_after=3)
    state = ckpt.load_training_state(run)
    state["meter"] = {"rng": np.random.RandomState(1), "iter": 3}  # what a PowerSGD run also held
    torch.save(state, run / ckpt.LEGACY_CHECKPOINT_NAME)  # exactly what earlier versions wrote
    (run / ckpt.CHECKPOINT_NAME).unlink()
    with pytest.raises(ckpt.LegacyStateError, match="python -m ernie_vl.train.legacy_state"):
        train(tiny_config(data, run, max_steps=6, resume=True))
    assert convert([str(run)]) == 0
    assert (run / "train_state.pt.converted").is_file() and not (run / ckpt.LEGACY_CHECKPOINT_NAME).exists()
    assert _same(ckpt.load_training_state(run), state)
    result = train(tiny_config(data, run, max_steps=6, resume=True))
    assert result.steps == 6 and [r["step"] for r in read_log(run)] == list(range(1, 7))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_legacy_converter_refuses_a_crafted_pickle(tmp_path, capsys):
    from ernie_vl.train.legacy_state import main as convert

    marker = tmp_path / "exploit-ran"
    _write_exploit(tmp_path / ckpt.LEGACY_CHECKPOINT_NAME, marker)
    assert convert([str(tmp_path)]) == 2
    assert "refused by the restricted unpickler" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / ckpt.CHECKPOINT_NAME).exists()


def test_a_fresh_run_over_a_saved_state_warns(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, max_steps=2))
    with pytest.warns(UserWarning, match="starts over from step 0 and will replace"):
        train(tiny_config(data, run, max_steps=2))


def test_a_deeply_nested_state_header_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    metadata = {"ernie_vl_format": ckpt.STATE_FORMAT, "ernie_vl_version": ckpt.STATE_VERSION,
                "state": '{"list": [' * 50_000 + "1" + "]}" * 50_000}
    save_file({"t0": torch.zeros(1)}, str(tmp_path / ckpt.CHECKPOINT_NAME), metadata=metadata)
    with pytest.raises(ValueError, match="nested too deeply"):
        ckpt.load_training_state(tmp_path)
