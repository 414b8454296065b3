"""DDP on gloo: 2 processes match 1 process with the same global batch; PowerSGD trains and is measured."""
from __future__ import annotations

import pytest
import torch

from _train_helpers import make_tiny_data, read_log, spawn_ranks, tiny_config
from ernie_vl.train import train
from ernie_vl.train.distributed import PowerSGDMeter, torchrun_command, wrap_model, DistContext

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


def _spawn(cfg, world=2):
    spawn_ranks(cfg, world, timeout=240)


def test_two_gloo_processes_match_one_process(data, tmp_path):
    # aux loss off: the MoE load-balancing loss is computed per rank on the local tokens, so with it
    # the two runs differ by design; everything else (gathered contrastive loss, mean CE) is global
    # the few-shot recipe off: its drop-path and jitter draw per rank, which no 2-process run can match
    common = dict(max_steps=STEPS, recipe="off", model_overrides={"loss": {"aux_weight": 0.0}})
    single = train(tiny_config(data, tmp_path / "one", **common))
    _spawn(tiny_config(data, tmp_path / "two", **common))
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        for key in ("loss", "image_text", "video_cls", "video_text"):
            assert b[key] == pytest.approx(a[key], abs=2e-4, rel=2e-4), (a["step"], key, a[key], b[key])
    assert two[0]["samples"] == one[0]["samples"] == 12  # same global batch
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3
    assert single.steps == STEPS


def test_powersgd_run_learns_and_reports_compression(data, tmp_path):
    cfg = tiny_config(data, tmp_path / "psgd", max_steps=20, powersgd_rank=1, powersgd_warmup=2, lr=1e-3)
    _spawn(cfg)
    log = read_log(tmp_path / "psgd")
    losses = [r["loss"] for r in log]
    # per-step losses of random batches are noisy: compare the means of the first and last five steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    comp = [r["gradient_compression"] for r in log]
    assert not comp[0]["compressing"] and comp[0]["compression_ratio"] == 1.0
    late = comp[-1]
    assert late["compressing"] and late["grad_elements_sent"] < late["grad_elements_dense"]
    assert late["compression_ratio"] == pytest.approx(late["grad_elements_dense"] / late["grad_elements_sent"])
    assert late["compression_ratio"] > 2.0


def test_powersgd_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="PowerSGD.*FSDP"):
        wrap_model(torch.nn.Linear(2, 2), DistContext(), parallel="fsdp", powersgd_rank=4)
    with pytest.raises(ValueError, match="rank"):
        PowerSGDMeter(0, 10)


def test_torchrun_command_launches_this_package():
    cmd = torchrun_command(2, ["--config", "x.json"], port=29999)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[-3:] == ["ernie_vl.train", "--config", "x.json"]
    with pytest.raises(ValueError):
        torchrun_command(0, [])


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "2", "RANK": "-1"},
                                 {"WORLD_SIZE": "2"}])
def test_init_distributed_refuses_a_rank_outside_the_world(monkeypatch, env):
    # checked before the rendezvous, which would otherwise wait for ranks that never come
    from ernie_vl.train.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"RANK={env.get('RANK', '<unset>')} with WORLD_SIZE=2: RANK must be .* 0\.\.1"):
        init_distributed(device="cpu")
    assert not torch.distributed.is_initialized()


def test_init_distributed_names_a_non_integer_variable(monkeypatch):
    from ernie_vl.train.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer"):
        init_distributed(device="cpu")


def test_init_distributed_one_process_is_rank_zero(monkeypatch):
    from ernie_vl.train.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")  # ignored without a world: one process is rank 0
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.device.type) == (0, 1, True, "cpu")
