"""Quantization-aware fine-tuning of a trained checkpoint, then conversion to the int8 model.

``qat_trainer(QATConfig(...))`` builds the usual :class:`~ernie_vl.train.trainer.Trainer` on the
checkpoint (its data, losses, optimiser and a short cosine schedule of ``steps`` steps) and makes its
model fake-quant (:func:`ernie_vl.quantize_aware.prepare_qat`); ``finetune_int8(trainer)`` trains
and returns the int8 model (``quantize_int8`` of the fine-tuned weights) with the training result.
The held-out sets of the config (``val_pairs`` / ``val_videos``) are ``trainer.val_pairs`` /
``trainer.val_videos`` (``ernie_vl.train.evaluation.evaluate`` measures any model on them).

A QAT run resumes as ``ernie-vl train --resume`` does: its state is the trainer's
``OUT/train_state.safetensors`` (safetensors + JSON, never a pickle; saved every ``checkpoint_every``
steps and/or ``checkpoint_minutes``), which also records the run's fingerprint (:func:`qat_fingerprint`:
the float weights' digest, this CPU's activation grid, the data and the optimisation settings).
``QATConfig(resume=True)`` continues from it, with the same optimiser, schedule, sampler and RNG states,
to the same final weights as an unbroken run; a saved run whose fingerprint differs is refused
(``ValueError`` naming each difference) before any data is decoded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ernie_vl.int8_engines import layer_activation_qmax
from ernie_vl.quantize_aware import convert_qat, prepare_qat
from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train.config import TrainConfig
from ernie_vl.train.run_settings import FINGERPRINT_KEY, differences, read_saved
from ernie_vl.train.trainer import Trainer

#: the entry of the training state that holds the QAT run's fingerprint
QAT_STATE_KEY = "qat"


@dataclass
class QATConfig:
    """A QAT run: ``checkpoint`` (a float ErnieVL folder), the data it was trained on (or like it), ``steps``
    optimiser steps at peak ``lr`` (cosine to 5% after ``warmup_steps``); ``out`` holds the run's log and state,
    saved every ``checkpoint_every`` steps (0: off) and/or ``checkpoint_minutes`` (0 or None: off) and at the end;
    ``resume`` continues the run saved there."""

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
    checkpoint_every: int = 0
    checkpoint_minutes: Optional[float] = 5.0
    resume: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"QAT steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"QAT checkpoint_every must be an int >= 0 (steps; 0 = off), got {self.checkpoint_every!r}")
        if not self.pairs and not self.videos:
            raise ValueError("QAT needs training data: pairs (image-text CSVs) and/or videos (class folders)")
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"QAT starts from a float checkpoint folder (config.json + model.safetensors); "
                             f"{self.checkpoint!r} is not one")


def qat_fingerprint(cfg: QATConfig) -> dict[str, Any]:
    """What the result of the QAT run ``cfg`` depends on: the float weights (the digest ``save_pretrained``
    recorded), the activation grid the fake-quant layers train for on this CPU, the training data (absolute
    paths) and the optimisation settings. Saved in the run's state; a resume must match it."""
    from ernie_vl.checkpoint import WEIGHTS_NAME, read_header

    weights = Path(cfg.checkpoint) / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"QAT starts from a float checkpoint folder; {str(weights)!r} is missing")
    digest = (read_header(weights).get("__metadata__") or {}).get("sha256")
    return {"model_weights_sha256": digest, "activation_qmax": layer_activation_qmax(),
            "pairs": [os.path.abspath(p) for p in cfg.pairs], "videos": [os.path.abspath(v) for v in cfg.videos],
            "steps": cfg.steps, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "batch_pairs": cfg.batch_pairs,
            "batch_videos": cfg.batch_videos if cfg.videos else 0, "seed": cfg.seed}


def check_resume(cfg: QATConfig, fingerprint: dict[str, Any]) -> None:
    """With ``cfg.resume`` and a saved state in ``cfg.out``: ``ValueError`` unless that state is a QAT run with
    this ``fingerprint`` (the message names every difference). Reads the state's header only."""
    if not cfg.resume or not ckpt.has_training_state(cfg.out):
        return
    saved = read_saved(cfg.out, QAT_STATE_KEY)
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {cfg.out!r} holds a training state that is not a QAT run (an `ernie-vl train` "
                         f"run?); give QAT its own work folder")
    diffs = differences(saved, fingerprint)
    if diffs:
        raise ValueError(f"resume: the QAT run saved in {cfg.out!r} was started from another model or with other "
                         f"settings: {'; '.join(diffs)}. Resume with the same model and settings, or start over "
                         f"(without resume, or in a new work folder)")


class QATTrainer(Trainer):
    """The :class:`Trainer` of a QAT run: its model fake-quant (``prepare_qat``) and its saved state carrying
    the run's fingerprint under ``QAT_STATE_KEY``."""

    def __init__(self, cfg: TrainConfig, fingerprint: dict[str, Any]) -> None:
        self.fingerprint = fingerprint
        super().__init__(cfg)  # a resumed run loads its float weights and optimiser state here
        prepare_qat(self.model)  # in place: the optimiser's parameters are the same objects

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), QAT_STATE_KEY: self.fingerprint}

    def _check_settings(self) -> bool:
        """``qat_trainer`` has checked the QAT fingerprint: a QAT state saved before the training settings were
        recorded resumes without the warning that they cannot be checked."""
        if read_saved(self.out, FINGERPRINT_KEY) is None:
            return False
        return super()._check_settings()


def qat_trainer(cfg: QATConfig) -> QATTrainer:
    """A Trainer on ``cfg.checkpoint`` whose model computes as the int8 model will (fake-quant layers); with
    ``cfg.resume``, at the step its saved state reached (a mismatched state raises ``ValueError`` first)."""
    fingerprint = qat_fingerprint(cfg)
    check_resume(cfg, fingerprint)
    train_cfg = TrainConfig(out=cfg.out, model=cfg.checkpoint, pairs=list(cfg.pairs), videos=list(cfg.videos),
                            val_pairs=cfg.val_pairs, val_videos=cfg.val_videos, max_steps=cfg.steps, minutes=None,
                            lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps), batch_pairs=cfg.batch_pairs,
                            batch_videos=cfg.batch_videos if cfg.videos else 0, threads=cfg.threads, seed=cfg.seed,
                            progress=cfg.progress, num_workers=cfg.num_workers, checkpoint_every=cfg.checkpoint_every,
                            checkpoint_minutes=cfg.checkpoint_minutes, resume=cfg.resume, video_init="keep")
    return QATTrainer(train_cfg, fingerprint)


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
