"""Shared helpers of the training tests: tiny synthetic data and a small, fast TrainConfig."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ernie_vl.data import synthetic
from ernie_vl.train import TrainConfig

MOTION = ("move_left", "move_right", "grow", "shrink")


def make_tiny_data(root: Path) -> dict[str, Path]:
    """48 captioned shapes (+12 held out) and 4 motion classes x 3 clips of 4 frames, 32 px."""
    shapes = synthetic.make_shapes(root / "shapes", num_train=48, num_val=0, num_heldout=12, image_size=32, seed=0)
    motion = synthetic.make_motion(root / "motion", num_train_per_class=3, num_val_per_class=1, num_frames=4,
                                   size=32, seed=0, classes=MOTION)
    return {"pairs": shapes.csv["train"], "val_pairs": shapes.csv["heldout"],
            "videos": motion.folders["train"], "val_videos": motion.folders["val"]}


def tiny_config(data: dict[str, Path], out: Path, **overrides) -> TrainConfig:
    """The ``test`` preset, 8 pairs + 4 clips per step, no workers, no progress bar, one thread."""
    kw = dict(out=str(out), model="test", pairs=[str(data["pairs"])], videos=[str(data["videos"])],
              batch_pairs=8, batch_videos=4, max_steps=6, warmup_steps=2, lr=2e-3, num_workers=0,
              progress=False, threads=1, seed=0, decode_cache=None)
    kw.update(overrides)
    return TrainConfig(**kw)


def kill_at(monkeypatch, step: int) -> None:
    """Make training step ``step`` raise ``KeyboardInterrupt``, as a kill in the middle of it would end the run
    (the state saved before it stays)."""
    from ernie_vl.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            raise KeyboardInterrupt(f"killed in step {step}")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def read_log(out: Path) -> list[dict]:
    with open(Path(out) / "log.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def dist_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    """Entry of a spawned rank: torchrun's environment, then ``train``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from ernie_vl.train import train
    from ernie_vl.train.distributed import shutdown_distributed

    try:
        train(TrainConfig.from_dict(cfg_dict))
    finally:
        shutdown_distributed()


def spawn_ranks(cfg: TrainConfig, world: int = 2, timeout: float = 240.0) -> None:
    """Train ``cfg`` on ``world`` gloo ranks; fails on a rank's error or timeout."""
    from ernie_vl.train.distributed import free_port

    port = free_port()
    start_and_join(dist_worker, [(r, world, port, cfg.to_dict()) for r in range(world)],
                   ["_train_helpers", "ernie_vl.train.trainer", "encoders.text"], timeout)


def start_and_join(target, arg_lists: list[tuple], preload: list[str], timeout: float) -> None:
    """One process per argument tuple (forkserver with ``preload`` imported once: each rank then starts in
    a fraction of a second; a plain fork could inherit OpenMP state); all joined; raises when one fails
    or outlives ``timeout``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    procs = [ctx.Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if alive:
        raise TimeoutError(f"{len(alive)} of {len(procs)} workers ({target.__name__}) did not finish within {timeout:.0f} s")
    codes = [p.exitcode for p in procs]
    if codes != [0] * len(procs):
        raise RuntimeError(f"workers ({target.__name__}) exited with {codes}")
