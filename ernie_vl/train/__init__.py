"""Training: ``train(TrainConfig) -> TrainResult``; ``torchrun -m ernie_vl.train ...`` runs it distributed."""
from __future__ import annotations

from ernie_vl.train.config import TrainConfig, TrainResult


def train(cfg: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Train ErnieVL as ``cfg`` says (see ``ernie_vl.train.trainer.Trainer``)."""
    from ernie_vl.train.trainer import train as _train

    return _train(cfg, stop_after=stop_after)


__all__ = ["TrainConfig", "TrainResult", "train"]
