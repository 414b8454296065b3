"""Training checkpoints for exact resume, written atomically.

A training state (model, optimizer, scheduler, sampler, RNG states, step) is
saved with ``torch.save`` to ``<dir>/.<name>.tmp-<pid>``, flushed and fsynced,
then ``os.replace``-d onto ``<dir>/<name>``: a crash mid-write leaves the last
good checkpoint untouched. (The released model is the separate safetensors
folder written by ``save_pretrained``; this file is only for resuming.)
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "train_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_training_state(directory: str | Path, state: dict[str, Any]) -> Path:
    return atomic_torch_save(state, Path(directory) / CHECKPOINT_NAME)


def load_training_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint {str(path)!r} to resume from")
    try:
        # weights_only=False: the state holds Python RNG tuples and numpy arrays; only our own files are loaded
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated / not a checkpoint
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err})") from err
