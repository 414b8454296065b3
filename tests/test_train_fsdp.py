"""FSDP2 (``fully_shard`` per block, then the root) on 2 gloo ranks: the steps equal one process's, and
the consolidated checkpoints move between an FSDP2 run and a one-process run both ways."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed as dist

from _train_helpers import make_tiny_data, read_log, spawn_ranks, tiny_config
from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train import train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
STEPS = 3
# the MoE aux loss is per rank under data parallelism (equal only with --expert-parallel), the recipe's
# drop-path draws per rank: both off so that one process and two ranks compute the same thing
COMMON = dict(max_steps=STEPS, recipe="off", grad_clip=1.0, lr=5e-3, model_overrides={"loss": {"aux_weight": 0.0}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_runs")
    data = make_tiny_data(root / "data")
    train(tiny_config(data, root / "one", **COMMON))

    spawn_ranks(tiny_config(data, root / "fsdp", parallel="fsdp", **COMMON), world=2, timeout=300)
    return root, data


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp2_steps_equal_one_process(runs):
    root, _ = runs
    one, two = read_log(root / "one"), read_log(root / "fsdp")
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        for key in ("loss", "image_text", "video_cls", "video_text"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key, a[key], b[key])
        # step 1's gradient is taken at the same initial weights: equal to 1e-5. Later ones at weights
        # that AdamW moved by lr * g / (|g| + eps): for a near-zero g the float32 summation order (one
        # batch vs the average of two halves) decides that step's sign, which leaves ~1e-5 differences
        tol = 1e-5 if a["step"] == 1 else 1e-4
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=tol), (a["step"], a["grad_norm"], b["grad_norm"])
    from safetensors.torch import load_file

    final_one = load_file(str(root / "one" / "final" / "model.safetensors"))
    final_two = load_file(str(root / "fsdp" / "final" / "model.safetensors"))
    assert _max_diff(final_one, final_two) < 2e-4  # seen: 5e-5 (the AdamW sign effect above)
    num = sum(float((final_one[k] - final_two[k]).square().sum()) for k in final_one)
    den = sum(float(final_one[k].square().sum()) for k in final_one)
    assert (num / den) ** 0.5 < 1e-5  # seen: 4.5e-6 relative over all parameters


def test_fsdp2_training_state_is_the_one_process_state(runs):
    root, data = runs
    one, two = ckpt.load_training_state(root / "one"), ckpt.load_training_state(root / "fsdp")
    assert _max_diff(one["model"], two["model"]) < 2e-4  # as the final weights above
    slots = one["optimizer"]["state"]
    assert set(slots) == set(two["optimizer"]["state"]) and len(slots) > 20
    for i, slot in slots.items():
        for key, value in slot.items():
            other = two["optimizer"]["state"][i][key]
            # full (gathered) AdamW moments, equal up to the gradients' float32 differences
            scale = float(value.abs().max()) if value.dim() else 1.0
            assert other.shape == value.shape and float((other - value).abs().max()) <= 1e-3 * scale + 1e-9, (i, key)
    from ernie_vl.train.trainer import Trainer

    trainer = Trainer(tiny_config(data, root / "fsdp", resume=True, **COMMON))  # one process resumes it
    assert trainer.step == STEPS
    assert _max_diff(trainer.model.state_dict(), two["model"]) == 0.0
    trainer.log_file.close()


def test_one_process_state_resumes_under_fsdp2(runs, tmp_path):
    """The one-process run's state loads into 2 FSDP2 ranks (its schedule is done: nothing more runs)
    and is written back unchanged by them, model and optimiser."""
    root, data = runs
    run = tmp_path / "again"
    shutil.copytree(root / "one", run)
    before = ckpt.load_training_state(run)
    spawn_ranks(tiny_config(data, run, parallel="fsdp", resume=True, **COMMON), world=2, timeout=300)
    after = ckpt.load_training_state(run)
    assert after["step"] == STEPS
    assert _max_diff(before["model"], after["model"]) == 0.0
    for i, slot in before["optimizer"]["state"].items():
        for key, value in slot.items():
            assert torch.equal(after["optimizer"]["state"][i][key], value), (i, key)


def test_fsdp2_refuses_an_ema(runs, tmp_path):
    root, data = runs
    with pytest.raises(RuntimeError, match="exited with"):  # the ranks stop at start with the ValueError
        spawn_ranks(tiny_config(data, tmp_path / "ema", parallel="fsdp", ema=0.9, **COMMON), world=2, timeout=300)
    assert not (tmp_path / "ema" / "log.jsonl").exists() or not read_log(tmp_path / "ema")
