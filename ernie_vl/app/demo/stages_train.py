"""Demo stages 1-2: write the synthetic data, train the model (resuming an interrupted run)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ernie_vl.app.demo.runner import StageContext
from ernie_vl.app.demo.workspace import Workspace

TRAIN_PARAMS_FILE = "demo_train_params.json"


def generate_data(ws: Workspace, ctx: StageContext) -> dict:
    """Captioned shapes (train / val / held-out compositions) and motion-action clips (train / val)."""
    from ernie_vl.data.synthetic import make_motion, make_shapes

    cfg = ws.cfg
    data_root = ws.root / "data"
    if data_root.exists():  # a partial or differently sized earlier run: start clean
        shutil.rmtree(data_root)
    bar = ctx.bar(total=2, unit="dataset")
    bar.set_postfix_str("captioned shapes")
    sizes = cfg.pixel_sizes()
    shapes = make_shapes(ws.shapes_dir, num_train=cfg.num_train_images, num_val=cfg.num_val_images,
                         num_heldout=cfg.num_heldout_images, image_size=sizes["image_size"], seed=cfg.seed)
    bar.update(1)
    bar.set_postfix_str("motion clips")
    motion = make_motion(ws.motion_dir, num_train_per_class=cfg.num_train_clips_per_class,
                         num_val_per_class=cfg.num_val_clips_per_class, num_frames=cfg.num_frames,
                         size=sizes["video_size"], seed=cfg.seed)
    bar.update(1)
    return {
        "images": dict(shapes.counts),
        "clips": dict(motion.counts),
        "classes": list(motion.classes),
        "heldout_combinations": [" ".join(c) for c in shapes.heldout_combos],
        "csv": {split: ws.rel(p) for split, p in shapes.csv.items()},
        "video_folders": {split: ws.rel(p) for split, p in motion.folders.items()},
    }


def _prepare_train_dir(ws: Workspace, params: dict) -> bool:
    """Empty the trainer's folder when it holds a run with other settings; True when a resume state is there."""
    from ernie_vl.train.checkpointing import CHECKPOINT_NAME

    marker = ws.train_dir / TRAIN_PARAMS_FILE
    if ws.train_dir.exists():
        try:
            same = json.loads(marker.read_text()) == params
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(ws.train_dir)
    ws.train_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params, sort_keys=True))
    return (ws.train_dir / CHECKPOINT_NAME).exists()


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder to ``dst`` through a temporary sibling, so ``dst`` is never half written."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_model(ws: Workspace, ctx: StageContext) -> dict:
    """Train the preset on the synthetic data within the time budget; the checkpoint goes to ``DIR/model``."""
    from ernie_vl.train import TrainConfig, train

    cfg = ws.cfg
    params = {**cfg.train_params(), **cfg.data_params()}
    resume = _prepare_train_dir(ws, params)
    extra = {k: v for k, v in (("batch_pairs", cfg.batch_pairs), ("batch_videos", cfg.batch_videos),
                                ("warmup_steps", cfg.warmup_steps)) if v}
    train_cfg = TrainConfig(
        out=str(ws.train_dir),
        model=cfg.model,
        pairs=[str(ws.csv("train"))],
        videos=[str(ws.videos("train"))],
        val_pairs=str(ws.csv("heldout")),
        val_videos=str(ws.videos("val")),
        num_frames=cfg.num_frames,
        minutes=cfg.train_minutes,
        max_steps=cfg.max_train_steps or None,
        seed=cfg.seed,
        lr=cfg.lr,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        resume=resume,
        progress=ctx.show_progress,
        **extra,
    )
    result = train(train_cfg)
    if result.steps == 0:
        raise RuntimeError(f"training took no step within the {cfg.train_minutes}-minute budget (loading the data "
                           f"used it up); give more time with --minutes")
    _copy_checkpoint(Path(result.final_dir), ws.model_dir)
    ws.forget_models()
    return {
        "steps": int(result.steps),
        "seconds": float(result.seconds),
        "samples_per_s": float(result.samples_per_s),
        "resumed": bool(resume),
        "last_losses": {k: float(v) for k, v in result.last_losses.items()},
        "evaluation": dict(result.evaluation),
        "routing": result.routing,
        "log": ws.rel(result.log_path),
        "checkpoint": ws.rel(ws.model_dir),
        "num_parameters": _count_parameters(ws),
    }


def _count_parameters(ws: Workspace) -> int:
    model = ws.model()
    return int(sum(p.numel() for p in model.parameters()))
