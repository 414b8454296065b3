"""``--resume`` checks the saved run's defining settings: each change refused before the data, safe changes
accepted and still exact, a larger max_steps on a flat LR extends the run exactly, older states warn."""
from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file

from _train_helpers import make_tiny_data, read_log, tiny_config
from ernie_vl.train import train
from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train.run_settings import FINGERPRINT_KEY
from ernie_vl.train.trainer import Trainer

SMALL = dict(max_steps=8, batch_pairs=4, batch_videos=2, checkpoint_minutes=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """A run stopped after 2 of its 8 steps (its state saved)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(tiny_config(data, run, **SMALL), stop_after=2)
    return run


def _refuse_before_build(monkeypatch):
    def no_build(self):
        raise AssertionError("the model (and then the data) was built before the refusal")

    monkeypatch.setattr(Trainer, "_build_model", no_build)


CHANGES = {
    "lr": dict(lr=1e-3),
    "batch_pairs": dict(batch_pairs=8),
    "batch_videos": dict(batch_videos=4),
    "model": dict(model="tiny"),
    "model_overrides": dict(model_overrides={"backbone": {"num_experts": 2}}),
    "seed": dict(seed=1),
    "label_smoothing": dict(label_smoothing=0.1),
    "caption_positives": dict(caption_positives=True),
    "image_rotate": dict(image_rotate=10.0),
    "mixup": dict(mixup=0.2),
    "ema": dict(ema=0.9),
    "recipe": dict(recipe="auto"),
    "curriculum": dict(curriculum=True),
    "max_steps": dict(max_steps=12),
    "warmup_steps": dict(warmup_steps=3),
    "weight_decay": dict(weight_decay=0.3),
    "grad_accum": dict(grad_accum=2),
    "autocast": dict(autocast="bf16"),
    "sampler": dict(sampler="priority"),
    "cache_max_mb": dict(cache_max_mb=0.0),
    "powersgd_rank": dict(powersgd_rank=2),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_each_defining_change_is_refused_before_the_data(data, saved, monkeypatch, name):
    _refuse_before_build(monkeypatch)
    cfg = tiny_config(data, saved, resume=True, **{**SMALL, **CHANGES[name]})
    with pytest.raises(ValueError) as err:
        Trainer(cfg)
    message = str(err.value)
    assert f"other settings: {name} " in message and message.count(" then, ") == 1, message  # that one alone
    assert "rerun with those" in message and "new --out" in message


def test_other_data_is_refused_by_path_and_by_identity(data, saved, monkeypatch):
    _refuse_before_build(monkeypatch)
    copy = data["pairs"].with_name("copy.csv")
    shutil.copyfile(data["pairs"], copy)
    with pytest.raises(ValueError, match=r"settings: pairs \[\{'path': .*copy\.csv"):
        Trainer(tiny_config(data, saved, resume=True, **{**SMALL, "pairs": [str(copy)]}))
    with pytest.raises(ValueError, match=r"settings: videos \[\{'path': .*\] then, \[\] now"):
        Trainer(tiny_config(data, saved, resume=True, **{**SMALL, "videos": []}))
    # the same path, but the file was changed since (its mtime): refused too, then accepted once restored
    st = os.stat(data["pairs"])
    try:
        os.utime(data["pairs"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(ValueError, match=r"settings: pairs .*'mtime_ns'"):
            Trainer(tiny_config(data, saved, resume=True, **SMALL))
    finally:
        os.utime(data["pairs"], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_several_changes_are_all_named(data, saved, monkeypatch):
    _refuse_before_build(monkeypatch)
    with pytest.raises(ValueError) as err:
        Trainer(tiny_config(data, saved, resume=True, **{**SMALL, "lr": 1e-3, "seed": 3}))
    assert "lr 0.002 then, 0.001 now" in str(err.value) and "seed 0 then, 3 now" in str(err.value)


def test_the_cli_refuses_with_the_differences(data, saved, capsys):
    from ernie_vl.app.cli import main

    before = (saved / ckpt.CHECKPOINT_NAME).read_bytes()
    rc = main(["train", "--model", "test", "--pairs", str(data["pairs"]), "--videos", str(data["videos"]),
               "--out", str(saved), "--max-steps", "8", "--batch-pairs", "4", "--batch-videos", "2",
               "--warmup-steps", "2", "--lr", "0.004", "--num-workers", "0", "--threads", "1", "--no-progress",
               "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "lr 0.002 then, 0.004 now" in err and "new --out" in err, err
    assert (saved / ckpt.CHECKPOINT_NAME).read_bytes() == before  # nothing touched


def test_safe_changes_resume_to_the_unbroken_run(data, tmp_path):
    full = train(tiny_config(data, tmp_path / "full", **SMALL))
    train(tiny_config(data, tmp_path / "part", **SMALL), stop_after=4)
    safe = dict(minutes=30.0, threads=2, num_workers=1, log_every=2, checkpoint_every=3, checkpoint_minutes=1.0,
                progress=True, val_pairs=str(data["val_pairs"]), eval_every=5, eval_max_pairs=8,
                decode_cache=str(tmp_path / "cache"))
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "part", moved)  # a run folder may move
    rest = train(tiny_config(data, moved, resume=True, **{**SMALL, **safe}))
    assert rest.steps == full.steps == 8
    reference = {r["step"]: r for r in read_log(tmp_path / "full")}
    for record in read_log(moved):
        assert record["loss"] == pytest.approx(reference[record["step"]]["loss"], abs=1e-6, rel=0), record["step"]
    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(moved / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= 1e-6


def test_a_larger_max_steps_on_a_flat_lr_extends_the_run_exactly(data, tmp_path):
    flat = dict(SMALL, min_lr_ratio=1.0)
    train(tiny_config(data, tmp_path / "full", **flat))
    short = train(tiny_config(data, tmp_path / "run", **{**flat, "max_steps": 5}))
    assert short.steps == 5
    longer = train(tiny_config(data, tmp_path / "run", resume=True, **flat))
    assert longer.steps == 8 and [r["step"] for r in read_log(tmp_path / "run")] == list(range(1, 9))
    for a, b in zip(read_log(tmp_path / "full"), read_log(tmp_path / "run")):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6, rel=0), a["step"]
    state = ckpt.load_training_state(tmp_path / "run")
    assert state[FINGERPRINT_KEY]["max_steps"] == 8 and state["schedule"]["total_steps"] == 8
    # a shorter one is still refused, as is a longer one when the cosine decays
    with pytest.raises(ValueError, match="max_steps 8 then, 6 now"):
        Trainer(tiny_config(data, tmp_path / "run", resume=True, **{**flat, "max_steps": 6}))


def test_a_state_saved_before_the_fingerprint_resumes_with_a_warning(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, **SMALL), stop_after=3)
    state = ckpt.load_training_state(run)
    assert FINGERPRINT_KEY in state
    del state[FINGERPRINT_KEY]
    ckpt.save_training_state(run, state)
    with pytest.warns(UserWarning, match="saved before runs recorded their settings.*cannot be checked"):
        result = train(tiny_config(data, run, resume=True, **{**SMALL, "lr": 1e-3}))
    assert result.steps == 8 and ckpt.load_training_state(run)[FINGERPRINT_KEY]["lr"] == 1e-3


def test_another_layout_resumes_with_a_warning(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, run, **SMALL), stop_after=2)
    with pytest.warns(UserWarning, match=r"another layout \(parallel 'ddp' then, 'fsdp' now\)"):
        trainer = Trainer(tiny_config(data, run, resume=True, parallel="fsdp", **SMALL))
    assert trainer.step == 2
    trainer.log_file.close()


def test_the_cli_takes_a_flat_schedule():
    from ernie_vl.app.cli import build_parser
    from ernie_vl.train.arguments import config_from_args

    args = build_parser().parse_args(["train", "--out", "x", "--pairs", "a.csv", "--max-steps", "4",
                                      "--min-lr-ratio", "1"])
    assert config_from_args(args).min_lr_ratio == 1.0
    default = build_parser().parse_args(["train", "--out", "x", "--pairs", "a.csv", "--max-steps", "4"])
    assert config_from_args(default).min_lr_ratio == 0.05


def test_a_run_folder_moved_with_its_data_resumes(data, tmp_path, monkeypatch):
    root = tmp_path / "a"
    shutil.copytree(data["pairs"].parent.parent, root / "data")  # copytree keeps the mtimes

    def config(base, **kw):
        moved = {k: base / "data" / v.relative_to(data["pairs"].parent.parent) for k, v in data.items()}
        return tiny_config(moved, base / "run", **{**SMALL, **kw})

    train(config(root), stop_after=2)
    shutil.copytree(root, tmp_path / "b")
    trainer = Trainer(config(tmp_path / "b", resume=True))
    assert trainer.step == 2
    trainer.log_file.close()
    # the same relative place but another file there: refused
    with open(tmp_path / "b" / "data" / "shapes" / "train.csv", "a", encoding="utf-8") as f:
        f.write("\n")
    _refuse_before_build(monkeypatch)
    with pytest.raises(ValueError, match=r"settings: pairs .*'size'"):
        Trainer(config(tmp_path / "b", resume=True))


def _resume_rank(rank: int, world: int, port: int, cfg_dict: dict, report: str) -> None:
    """A spawned rank that builds the resumed Trainer and writes the ValueError it gets to ``report.<rank>``."""
    from ernie_vl.train import TrainConfig
    from ernie_vl.train.distributed import shutdown_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        Trainer(TrainConfig.from_dict(cfg_dict))
    except ValueError as err:
        with open(f"{report}.{rank}", "w", encoding="utf-8") as f:
            f.write(str(err))
    finally:
        shutdown_distributed()


def test_every_rank_refuses_a_changed_setting(data, saved, tmp_path):
    """Under 2 gloo ranks each rank reads the saved settings and refuses alike: no rank waits for the other."""
    from _train_helpers import start_and_join
    from ernie_vl.train.distributed import free_port

    before = (saved / ckpt.CHECKPOINT_NAME).read_bytes()
    cfg = tiny_config(data, saved, resume=True, **{**SMALL, "lr": 1e-3}).to_dict()
    port, report = free_port(), str(tmp_path / "refused")
    start_and_join(_resume_rank, [(r, 2, port, cfg, report) for r in range(2)],
                   ["_train_helpers", "ernie_vl.train.trainer", "test_train_resume_settings"], 120)
    for rank in range(2):
        assert "lr 0.002 then, 0.001 now" in (tmp_path / f"refused.{rank}").read_text(encoding="utf-8")
    assert (saved / ckpt.CHECKPOINT_NAME).read_bytes() == before


def test_path_identity_of_files_folders_and_shard_patterns(tmp_path):
    from ernie_vl.train.run_settings import path_identity, same_setting

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"{i:03d}.tar").write_bytes(b"x" * (i + 1))
    spec = str(shards / "{000..002}.tar")
    first = path_identity(spec, tmp_path / "run")
    assert first["files"] == 3 and first["size"] == 6 and first["from_out"] == os.path.join("..", "shards",
                                                                                           "{000..002}.tar")
    folder, file = path_identity(str(shards), tmp_path / "run"), path_identity(str(shards / "000.tar"), tmp_path)
    assert (folder["files"], folder["size"], file["size"]) == (3, 6, 1)
    (shards / "001.tar").write_bytes(b"y" * 5)  # one shard rewritten
    assert not same_setting(first, path_identity(spec, tmp_path / "run"))
    assert not same_setting(folder, path_identity(str(shards), tmp_path / "run"))
    assert same_setting(file, path_identity(str(shards / "000.tar"), tmp_path))
    assert path_identity(str(tmp_path / "missing.csv"), tmp_path)["from_out"] == "missing.csv"


def test_a_setting_added_since_the_save_counts_as_its_default(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(data, run, **SMALL), stop_after=2)
    state = ckpt.load_training_state(run)
    del state[FINGERPRINT_KEY]["image_rotate"]  # as if the field did not exist when the run was saved
    ckpt.save_training_state(run, state)
    trainer = Trainer(tiny_config(data, run, resume=True, **SMALL))  # the default: accepted, no warning needed
    assert trainer.step == 2
    trainer.log_file.close()
    _refuse_before_build(monkeypatch)
    with pytest.raises(ValueError, match="image_rotate 0.0 then, 10.0 now"):
        Trainer(tiny_config(data, run, resume=True, **{**SMALL, "image_rotate": 10.0}))
