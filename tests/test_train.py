"""The trainer: exact resume, priority updates, checkpoints, the CLI (train + eval), config checks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _train_helpers import make_tiny_data, read_log, tiny_config
from ernie_vl.train import TrainConfig, train
from ernie_vl.train.checkpointing import load_training_state


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("sampling", [{}, dict(sampler="uniform", hard_negative_share=0.5, hard_negative_group=2)],
                         ids=["priority", "uniform+hard-negatives"])
def test_resume_is_exact(data, tmp_path, sampling):
    """10 steps + resume + 10 steps == 20 steps (losses and every weight to 1e-6)."""
    small = dict(max_steps=20, batch_pairs=4, batch_videos=2, **sampling)
    full = train(tiny_config(data, tmp_path / "full", **small))
    part = train(tiny_config(data, tmp_path / "part", **small), stop_after=10)
    assert part.steps == 10 and not (tmp_path / "part" / "final").exists()
    rest = train(tiny_config(data, tmp_path / "part", resume=True, **small))
    assert full.steps == rest.steps == 20
    log_full, log_part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in log_part] == list(range(1, 21))
    for a, b in zip(log_full, log_part):
        for key in ("loss", "image_text", "video_cls", "video_text", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), (a["step"], key)
    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= 1e-6
    # the loss went down over the 20 steps, and the lr followed warm-up then cosine decay
    losses = [r["loss"] for r in log_full]
    assert sum(losses[-5:]) < sum(losses[:5])
    lrs = [r["lr"] for r in log_full]
    assert lrs[0] < lrs[1] and lrs[2] > lrs[-1]


def test_priority_sampler_state_is_trained_and_saved(data, tmp_path):
    train(tiny_config(data, tmp_path / "run", max_steps=4))
    state = load_training_state(tmp_path / "run")
    pair_losses = state["source"]["pair_sampler"]["losses"]
    seen = ~torch.isnan(pair_losses)
    assert int(seen.sum()) >= 8 and bool((pair_losses[seen] > 0).all())
    assert int(state["source"]["pair_sampler"]["draws"].sum()) == 4 * 8
    assert state["step"] == 4
    # defaults: shuffled epochs for pairs, loss-priority for clips
    assert state["source"]["pair_sampler"]["kind"] == "uniform"
    assert state["source"]["video_sampler"]["kind"] == "priority"
    video_losses = state["source"]["video_sampler"]["losses"]
    assert int((~torch.isnan(video_losses)).sum()) >= 4


def test_log_has_losses_lr_throughput_and_routing(data, tmp_path):
    train(tiny_config(data, tmp_path / "run", max_steps=2, val_pairs=str(data["val_pairs"]),
                      val_videos=str(data["val_videos"]), eval_every=1))
    records = read_log(tmp_path / "run")
    first = records[0]
    for key in ("loss", "image_text", "video_cls", "video_text", "aux", "lr", "samples_per_s"):
        assert isinstance(first[key], float)
    routing = first["routing"]
    assert len(routing["layers"]) == 2 and 0.0 <= routing["activated_param_ratio"] <= 1.0
    usage = torch.tensor(routing["usage_by_modality"])
    assert usage.shape == (3, 4)
    assert "eval" in first and 0.0 <= first["eval"]["text_to_image_R@1"] <= 1.0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0.0 <= result["video_top1"] <= 1.0


def test_cli_train_then_eval_json(data, tmp_path, capsys):
    from ernie_vl.app.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--model", "test", "--pairs", str(data["pairs"]), "--videos", str(data["videos"]),
               "--out", str(out), "--max-steps", "2", "--batch-pairs", "8", "--batch-videos", "4",
               "--num-workers", "0", "--threads", "1", "--no-progress"])
    assert rc == 0 and (out / "final" / "config.json").is_file()
    capsys.readouterr()
    rc = main(["eval", "--model", str(out / "final"), "--pairs", str(data["val_pairs"]),
               "--videos", str(data["val_videos"]), "--num-workers", "0", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1",
                "image_to_text_R@5", "image_to_text_R@10", "video_top1", "video_top5"):
        assert 0.0 <= result[key] <= 1.0
    assert result["video_top5"] == 1.0  # 4 classes: the top 5 holds every class
    assert result["num_pairs"] == 12 and result["num_videos"] == 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(pairs=[], videos=[]), "nothing to train on"),
    (dict(max_steps=None, minutes=None), "max_steps"),
    (dict(batch_pairs=1), "batch_pairs"),
    (dict(parallel="fsdp", powersgd_rank=2), "PowerSGD"),
    (dict(sampler="lossy"), "sampler"),
    (dict(video_sampler="lossy"), "video_sampler"),
    (dict(hard_negative_share=2.0), "hard_negative_share"),
])
def test_bad_config_is_refused(kwargs, match):
    base = dict(pairs=["x.csv"], max_steps=1)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**base)


def test_batch_must_split_over_accumulation(data, tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        train(tiny_config(data, tmp_path / "x", batch_pairs=6, grad_accum=4))


def test_streaming_path_when_data_exceeds_the_cache_budget(data, tmp_path):
    from ernie_vl.train.trainer import Trainer

    trainer = Trainer(tiny_config(data, tmp_path / "stream", max_steps=3, cache_max_mb=0.0))
    assert trainer.streaming and trainer.pairs is None
    result = trainer.run()
    records = read_log(tmp_path / "stream")
    assert result.steps == 3 and [r["samples"] for r in records] == [12, 12, 12]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    state = load_training_state(tmp_path / "stream")
    assert int((~torch.isnan(state["source"]["pair_sampler"]["losses"])).sum()) >= 8
    assert len(state["source"]["pending"]) >= 0  # prefetched draws are saved for an exact replay


def test_expert_curriculum_is_applied_from_the_config(data, tmp_path):
    from ernie_vl.moe import MoEFeedForward
    from ernie_vl.train.trainer import Trainer

    trainer = Trainer(tiny_config(data, tmp_path / "cur", max_steps=4, curriculum=True, curriculum_steps=3))
    layers = [m for m in trainer.model.modules() if isinstance(m, MoEFeedForward)]
    trainer.train_step()
    assert [m.top_k for m in layers] == [4] * len(layers)  # dense start: every expert
    while trainer.step < 4:
        trainer.train_step()
    assert [m.top_k for m in layers] == [m.config.top_k for m in layers] == [2] * len(layers)


def test_decoded_images_are_cached_as_a_memory_mapped_file(data, tmp_path):
    import os

    import ernie_vl
    from ernie_vl.data.sources import CachedPairs

    model = ernie_vl.create_model("test")
    args = ([str(data["val_pairs"])], model.preprocess, model.tokenizer)
    first = CachedPairs(*args, num_workers=0, progress=False, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.u8"))
    assert len(files) == 1 and first.cache_file == files[0]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.progress.json"))
    os.utime(files[0], ns=(0, 0))  # would be replaced if decoded again
    second = CachedPairs(*args, num_workers=0, progress=False, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    assert os.stat(files[0]).st_mtime_ns == 0  # mapped, not rewritten
    fresh = CachedPairs(*args, num_workers=0, progress=False, cache_dir=None)  # the RAM path decodes the same
    assert torch.equal(fresh.images, second.images)
    os.utime(second.paths[0])  # a changed file makes a new cache entry
    CachedPairs(*args, num_workers=0, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.u8"))) == 2


def test_adamw_groups_and_cosine_schedule():
    import ernie_vl
    from ernie_vl.train.optim import build_optimizer, cosine_with_warmup

    model = ernie_vl.create_model("test")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n: id(p) in decay for n, p in model.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert not names["logits.log_scale"]
    assert not any(v for n, v in names.items() if n.endswith(".bias") or "norm" in n or "embed" in n)
    assert names["classifier.weight"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.defaults["fused"]  # float32 CPU parameters take the fused AdamW kernel
    assert build_optimizer(model.double(), lr=1e-3, weight_decay=0.1).defaults["foreach"]  # float64: foreach
    assert [round(cosine_with_warmup(s, 4, 14), 6) for s in (0, 3, 4, 9, 14, 20)] == [0.25, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert cosine_with_warmup(14, 4, 14, min_ratio=0.1) == pytest.approx(0.1)


def test_refitted_cosine_is_continuous_and_never_rises_after_warmup():
    from ernie_vl.train.optim import RefittableCosine, cosine_with_warmup

    sched = RefittableCosine(warmup_steps=4, total_steps=40, min_ratio=0.05)
    # before any refit it is the plain warm-up + cosine
    assert [sched.factor(s) for s in range(41)] == [cosine_with_warmup(s, 4, 40, 0.05) for s in range(41)]
    factors = []
    refits = {2: 30, 10: 80, 25: 35, 30: 200, 60: 70}  # lengths that shrink and grow, as a time budget does
    for step in range(80):
        if step in refits:
            before = sched.factor(step)
            sched.refit(step, refits[step])
            assert sched.factor(step) == pytest.approx(before, abs=1e-12)  # no jump at the refit
        factors.append(sched.factor(step))
    after = factors[4:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:])), "the LR rose after warm-up"
    assert after[0] == pytest.approx(1.0) and factors[69] > 0.05 and factors[70] == pytest.approx(0.05)
    short = RefittableCosine(warmup_steps=50, total_steps=6)
    short.refit(3, 6)  # a length inside the warm-up is kept: the run ends at step 6
    assert short.total_steps == 6 and short.factor(5) == pytest.approx(6 / 50)
    restored = RefittableCosine(4, 1, min_ratio=0.05)
    restored.load_state_dict(sched.state_dict())
    assert [restored.factor(s) for s in range(60, 80)] == factors[60:80]


class _FakeClock:
    """``time`` stand-in whose perf_counter advances ``slow`` s per call, then ``fast`` s after ``switch`` calls."""

    def __init__(self, slow: float, fast: float, switch: int) -> None:
        self.now, self.calls, self.slow, self.fast, self.switch = 0.0, 0, slow, fast, switch

    def perf_counter(self) -> float:
        self.calls += 1
        self.now += self.slow if self.calls < self.switch else self.fast
        return self.now

    def process_time(self) -> float:
        return self.now


def test_time_budget_refits_the_schedule_without_an_lr_jump(data, tmp_path, monkeypatch):
    from ernie_vl.train import trainer as trainer_module

    # steps get 4x faster part-way: each refit lengthens the schedule (the old refit made the LR jump up)
    monkeypatch.setattr(trainer_module, "time", _FakeClock(slow=1.0, fast=0.25, switch=40))
    result = train(tiny_config(data, tmp_path / "run", max_steps=None, minutes=1.0, warmup_steps=3,
                               calibration_steps=3, pairs=[str(data["pairs"])], videos=[]))
    lrs = [r["lr"] for r in result.history]
    assert len(lrs) > 25
    after = lrs[3:]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(after, after[1:])), f"LR rose after warm-up: {lrs}"
    assert after[0] == pytest.approx(2e-3) and after[-1] < 0.5 * after[0]
