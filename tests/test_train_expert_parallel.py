"""``ernie-vl train --expert-parallel``: 2 gloo ranks holding half the experts each match one process step
for step (aux losses on: they are reduced over the EP group), and checkpoints move across EP sizes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _train_helpers import make_tiny_data, read_log, spawn_ranks, tiny_config
from ernie_vl.train import train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_runs")
    # the few-shot recipe off (its drop-path and jitter draw per rank); grad clipping on: the norm
    # must include the other rank's experts
    common = dict(max_steps=STEPS, recipe="off", grad_clip=1.0, lr=5e-3, ema=0.9)
    train(tiny_config(data, root / "one", **common))
    spawn_ranks(tiny_config(data, root / "ep2", expert_parallel=2, **common), world=2, timeout=300)
    return root


def test_two_ranks_expert_parallel_match_one_process(runs):
    one, two = read_log(runs / "one"), read_log(runs / "ep2")
    assert len(one) == len(two) == STEPS
    keys = ("loss", "image_text", "video_cls", "video_text", "aux", "load_balance", "z_loss", "orthogonal", "grad_norm")
    for a, b in zip(one, two):
        for key in keys:  # float32 sums in another order: ~1e-6 relative seen
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key, a[key], b[key])
        # routing statistics of the EP group's global batch: the one-process counts, layer by layer
        counts = [layer["tokens_per_expert"] for layer in a["routing"]["layers"]]
        assert counts and [layer["tokens_per_expert"] for layer in b["routing"]["layers"]] == counts


def test_checkpoint_is_consolidated_and_equal(runs):
    from safetensors.torch import load_file

    wa = load_file(str(runs / "one" / "final" / "model.safetensors"))
    wb = load_file(str(runs / "ep2" / "final" / "model.safetensors"))
    assert set(wa) == set(wb)
    assert all(wa[k].shape == wb[k].shape for k in wa)
    assert any("experts.w1" in k and wa[k].shape[0] == 4 for k in wa)  # every expert, gathered
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_bad_expert_parallel_sizes_fail_at_start(data, tmp_path, capsys):
    from ernie_vl.app.cli import main

    code = main(["train", "--model", "test", "--pairs", str(data["pairs"]), "--out", str(tmp_path / "x"),
                 "--max-steps", "1", "--nproc", "3", "--expert-parallel", "2"])
    assert code == 2 and "world size 3 is not divisible by --expert-parallel 2" in capsys.readouterr().err
    assert not (tmp_path / "x" / "train_config.json").exists()  # refused before any worker started
    # 4 experts per layer in the test preset: 3 does not divide them (one process, no workers)
    with pytest.raises(ValueError, match="world size 1 is not divisible by --expert-parallel 3"):
        train(tiny_config(data, tmp_path / "z", expert_parallel=3, max_steps=1))
    with pytest.raises(ValueError, match="expert_parallel must be an integer >= 1"):
        tiny_config(data, tmp_path / "y", expert_parallel=0)


def test_checkpoint_loads_at_other_expert_parallel_sizes(runs, tmp_path):
    """The EP=2 run's final model loads at EP=4 and at EP=2 with 2 data-parallel replicas (4 ranks),
    gathers back to the file exactly, and what EP=4 saves loads in one process."""
    from _ep_helpers import reshard_ranks
    from safetensors.torch import load_file

    from ernie_vl import ErnieVL

    saved = runs / "ep2" / "final"
    results = reshard_ranks(4, saved, tmp_path)
    for res in results:
        assert res["4"] == 0.0 and res["2"] == 0.0, res  # gathered state == the file, bit for bit
    again = ErnieVL.from_pretrained(str(tmp_path / "saved_at_4"))
    original = load_file(str(saved / "model.safetensors"))
    state = again.state_dict()
    assert set(state) == set(original)
    assert max(float((state[k] - original[k]).abs().max()) for k in original) == 0.0


def test_training_state_saved_at_ep2_resumes_in_one_process(runs, data):
    """The EP=2 run's training state holds every expert and its AdamW moments gathered: it equals the
    one-process run's state, and a one-process trainer resumes from it."""
    from ernie_vl.train import checkpointing as ckpt
    from ernie_vl.train.trainer import Trainer

    one, two = ckpt.load_training_state(runs / "one"), ckpt.load_training_state(runs / "ep2")
    assert set(one["model"]) == set(two["model"])
    assert max(float((one["model"][k] - two["model"][k]).abs().max()) for k in one["model"]) < 1e-4
    moments = [(i, key) for i, slot in one["optimizer"]["state"].items() for key, v in slot.items()
               if isinstance(v, torch.Tensor) and v.dim()]
    assert len(moments) > 20
    for i, key in moments:
        a, b = one["optimizer"]["state"][i][key], two["optimizer"]["state"][i][key]
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5 * max(1.0, float(a.abs().max())), (i, key)
    shadow_one, shadow_two = one["ema"]["shadow"], two["ema"]["shadow"]  # the EMA, experts gathered too
    assert set(shadow_one) == set(shadow_two) and any("experts.w1" in k for k in shadow_two)
    assert max(float((shadow_one[k] - shadow_two[k]).abs().max()) for k in shadow_one) < 1e-4
    trainer = Trainer(tiny_config(data, runs / "ep2", max_steps=STEPS, recipe="off", grad_clip=1.0, lr=5e-3,
                                  resume=True, ema=0.9))
    assert trainer.step == STEPS
    resumed = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(resumed[i][key], two["optimizer"]["state"][i][key]) for i, key in moments)
    if trainer.log_file is not None:
        trainer.log_file.close()


def test_cli_nproc_2_expert_parallel_2_matches_one_process(runs, data, tmp_path):
    """``ernie-vl train --nproc 2 --expert-parallel 2`` (torchrun) logs the one-process run's losses."""
    from ernie_vl.app.cli import main

    out = tmp_path / "cli"
    code = main(["train", "--model", "test", "--pairs", str(data["pairs"]), "--videos", str(data["videos"]),
                 "--out", str(out), "--max-steps", str(STEPS), "--batch-pairs", "8", "--batch-videos", "4",
                 "--warmup-steps", "2", "--lr", "5e-3", "--grad-clip", "1.0", "--seed", "0", "--threads", "1",
                 "--num-workers", "0", "--no-progress", "--nproc", "2", "--expert-parallel", "2", "--ema", "0.9"])
    assert code == 0
    one, cli = read_log(runs / "one"), read_log(out)
    assert len(cli) == STEPS
    for a, b in zip(one, cli):
        for key in ("loss", "aux", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key, a[key], b[key])
