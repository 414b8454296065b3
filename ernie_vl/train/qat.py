"""Quantization-aware fine-tuning of a trained checkpoint, then conversion to the int8 model.

``qat_trainer(QATConfig(...))`` builds the usual :class:`~ernie_vl.train.trainer.Trainer` on the
checkpoint (its data, losses, optimiser and a short cosine schedule of ``steps`` steps) and makes its
model fake-quant (:func:`ernie_vl.quantize_aware.prepare_qat`); ``finetune_int8(trainer)`` trains
and returns the int8 model (``quantize_int8`` of the fine-tuned weights) with the training result.
The held-out sets of the config (``val_pairs`` / ``val_videos``) are ``trainer.val_pairs`` /
``trainer.val_videos`` (``ernie_vl.train.evaluation.evaluate`` measures any model on them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ernie_vl.quantize_aware import convert_qat, prepare_qat


@dataclass
class QATConfig:
    """A QAT run: ``checkpoint`` (a float ErnieVL folder), the data it was trained on (or like it), ``steps``
    optimiser steps at peak ``lr`` (cosine to 5% after ``warmup_steps``); ``out`` holds the run's log and state."""

    checkpoint: str
    out: str
    steps: int = 300
    pairs: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    val_pairs: str | None = None
    val_videos: str | None = None
    lr: float = 1e-4
    warmup_steps: int = 10
    batch_pairs: int = 64
    batch_videos: int = 32
    threads: int | None = None
    seed: int = 0
    num_workers: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"QAT steps must be an int >= 1, got {self.steps!r}")
        if not self.pairs and not self.videos:
            raise ValueError("QAT needs training data: pairs (image-text CSVs) and/or videos (class folders)")
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"QAT starts from a float checkpoint folder (config.json + model.safetensors); "
                             f"{self.checkpoint!r} is not one")


def qat_trainer(cfg: QATConfig):
    """A Trainer on ``cfg.checkpoint`` whose model computes as the int8 model will (fake-quant layers)."""
    from ernie_vl.train import TrainConfig
    from ernie_vl.train.trainer import Trainer

    train_cfg = TrainConfig(out=cfg.out, model=cfg.checkpoint, pairs=list(cfg.pairs), videos=list(cfg.videos),
                            val_pairs=cfg.val_pairs, val_videos=cfg.val_videos, max_steps=cfg.steps, minutes=None,
                            lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps), batch_pairs=cfg.batch_pairs,
                            batch_videos=cfg.batch_videos if cfg.videos else 0, threads=cfg.threads, seed=cfg.seed,
                            progress=cfg.progress, num_workers=cfg.num_workers, checkpoint_minutes=None, video_init="keep")
    trainer = Trainer(train_cfg)
    prepare_qat(trainer.model)  # in place: the optimiser's parameters are the same objects
    return trainer


def finetune_int8(trainer) -> tuple[nn.Module, object]:
    """Train ``trainer`` (from ``qat_trainer``) to the end of its steps; (int8 model, TrainResult)."""
    result = trainer.run()
    return convert_qat(trainer.model).eval(), result


def held_out_sources(model: nn.Module, val_pairs: str | None = None, val_videos: str | None = None,
                     progress: bool = False):
    """(pairs, videos): cached held-out sources for ``model`` as the Trainer builds them (its preprocessing,
    its clip length and size, its class names), for ``ernie_vl.train.evaluation.evaluate``; None where not given."""
    from ernie_vl.data.sources import CachedPairs, CachedVideos

    pairs = CachedPairs([val_pairs], model.preprocess, model.tokenizer, progress=progress) if val_pairs else None
    videos = None
    if val_videos:
        if model.class_names is None:
            raise ValueError("held-out videos need a model with a video classifier (class names)")
        size = model.cfg.video_encoder.image_size
        videos = CachedVideos([val_videos], num_frames=model.cfg.video_encoder.num_frames,
                              image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
                              mean=model.preprocess.mean, std=model.preprocess.std, tokenizer=model.tokenizer,
                              classes=list(model.class_names), progress=progress)
    return pairs, videos
