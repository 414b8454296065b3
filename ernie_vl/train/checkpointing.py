"""Training checkpoints for exact resume: safetensors + JSON, never a pickle, written atomically.

A training state (model, optimizer, scheduler, sampler, RNG states, step) is saved as one
``<dir>/train_state.safetensors``: every tensor and numpy array as a tensor, the rest of the
tree as JSON in the file's header (``ernie_vl.train.state_codec``). Loading it parses
safetensors and JSON only, so a run folder from elsewhere cannot run code. The file goes to
``<dir>/.<name>.tmp-<pid>``, is flushed and fsynced, then ``os.replace``-d into place: a crash
mid-write leaves the last good checkpoint. The older pickle file ``train_state.pt`` is refused
with :class:`LegacyStateError` (it is never opened). ``log.jsonl`` helpers keep a resumed log
free of repeated steps.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np
import torch

from ernie_vl.train import state_codec

CHECKPOINT_NAME = "train_state.safetensors"
LEGACY_CHECKPOINT_NAME = "train_state.pt"
LOG_NAME = "log.jsonl"
STATE_FORMAT = "ernie-vl-train-state"
STATE_VERSION = "1"


class LegacyStateError(ValueError):
    """A run folder holds only a pickle-based ``train_state.pt``, which is never loaded."""


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


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """``write(f)`` into a temporary sibling, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write` (tensor-only caches read back with ``weights_only=True``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_training_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/train_state.safetensors`` atomically."""
    from safetensors.torch import save

    skeleton, tensors = state_codec.pack(state)
    metadata = {"format": "pt", "ernie_vl_format": STATE_FORMAT, "ernie_vl_version": STATE_VERSION,
                "state": json.dumps(skeleton, allow_nan=False)}
    blob = save(tensors, metadata=metadata)
    return atomic_write(Path(directory) / CHECKPOINT_NAME, lambda f: f.write(blob))


def legacy_message(path: Path) -> str:
    return (f"{str(path)!r} is a training state in the old pickle format; it is not loaded, because "
            f"unpickling a file can run any code in it (run folders are shared like any download). "
            f"Resume needs {CHECKPOINT_NAME}, which this version writes. If you wrote this file yourself, convert "
            f"it: python -m ernie_vl.train.legacy_state {str(path.parent)!r} (PyTorch's restricted unpickler with "
            f"an allow-list); otherwise start the run again in a new --out")


def has_training_state(directory: str | Path) -> bool:
    """True when ``directory`` holds a resumable state; ``LegacyStateError`` when it holds only a pickle one."""
    directory = Path(directory)
    if (directory / CHECKPOINT_NAME).is_file():
        return True
    legacy = directory / LEGACY_CHECKPOINT_NAME
    if legacy.exists():
        raise LegacyStateError(legacy_message(legacy))
    return False


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor may point into a neighbour's storage as read; give it its own (torch.save refuses shared)."""
    return torch.empty(t.shape, dtype=t.dtype) if t.numel() == 0 else t


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """The state saved by :func:`save_training_state` (safetensors and JSON only; nothing unpickled)."""
    from safetensors import safe_open

    directory = Path(directory)
    if not has_training_state(directory):
        raise FileNotFoundError(f"no training checkpoint {str(directory / CHECKPOINT_NAME)!r} to resume from")
    path = directory / CHECKPOINT_NAME
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: _own_storage(f.get_tensor(name)) for name in f.keys()}
    except Exception as err:  # truncated / not a safetensors file
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read as safetensors "
                         f"({type(err).__name__}: {err})") from None
    if metadata.get("ernie_vl_format") != STATE_FORMAT or "state" not in metadata:
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read: it is not an ernie-vl training "
                         f"state (header format {metadata.get('ernie_vl_format')!r})")
    if metadata.get("ernie_vl_version") != STATE_VERSION:
        raise ValueError(f"training checkpoint {str(path)!r} has state version {metadata.get('ernie_vl_version')!r}; "
                         f"this code reads version {STATE_VERSION}")
    try:
        skeleton = json.loads(metadata["state"])
        state = state_codec.unpack(skeleton, tensors, f"training checkpoint {str(path)!r}")
    except json.JSONDecodeError as err:
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read: its state is not JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read: its state is nested too deeply") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read: no step recorded")
    return state


def read_state_entry(directory: str | Path, key: str) -> Any:
    """The top-level ``key`` of a saved training state, read from the file's JSON header alone (no tensor is
    loaded, nothing unpickled): for a quick check before a run is built. None when the state has no such
    entry; ``ValueError`` when the entry holds tensors or the header cannot be read."""
    from safetensors import safe_open

    path = Path(directory) / CHECKPOINT_NAME
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # truncated / not a safetensors file
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read as safetensors "
                         f"({type(err).__name__}: {err})") from None
    try:
        skeleton = json.loads(metadata.get("state", "null"))
    except json.JSONDecodeError as err:
        raise ValueError(f"training checkpoint {str(path)!r} cannot be read: its state is not JSON ({err})") from None
    if metadata.get("ernie_vl_format") != STATE_FORMAT or not isinstance(skeleton, dict):
        raise ValueError(f"training checkpoint {str(path)!r} is not an ernie-vl training state")
    entries = skeleton.get("dict")
    if not isinstance(entries, list):
        raise ValueError(f"training checkpoint {str(path)!r} is malformed: its state is not a dict")
    for entry in entries:
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == key:
            return state_codec.unpack(entry[1], {}, f"training checkpoint {str(path)!r}, entry {key!r}")
    return None


# ---------------------------------------------------------------------------- log.jsonl


def logged_steps(path: str | Path) -> int:
    """The last step recorded in a ``log.jsonl`` (0 when absent or empty)."""
    last = 0
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return last


def truncate_log(path: str | Path, step: int) -> int:
    """Keep only the records of steps <= ``step`` (and drop a half-written last line); returns how many went.

    Rewritten atomically, so a resumed run appends after its checkpoint's step and never repeats one.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept: list[str] = []
    dropped = 0
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        data = "".join(kept).encode("utf-8", errors="surrogateescape")
        atomic_write(path, lambda f: f.write(data))
    return dropped
