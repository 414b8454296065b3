"""What defines a training run, recorded in its saved state and checked when the run is resumed.

``train_fingerprint(cfg, world_size, device_type)`` is the part of a :class:`TrainConfig` that changes the
numbers a run computes; the trainer saves it in ``train_state.safetensors`` under ``FINGERPRINT_KEY``, and
``--resume`` compares it with the new command line (``check_training_resume``) before any data is decoded;
a setting the saved state lacks (a field added to ``TrainConfig`` since) counts as its default there.
QAT (``ernie_vl.train.qat``) compares its own fingerprint with the same code.

Defining (a change is refused): the model (preset name and ``model_overrides``, or a checkpoint folder: the
weights' digest), the data (absolute paths; size and mtime of each CSV, file count, total size and newest
mtime of each video folder: a cheap identity, not a content hash; a run folder moved together with its data,
their relative places and identities unchanged, still matches), the columns and
prompts, batch sizes, ``grad_accum``, lr, schedule (``max_steps``, ``warmup_steps``, ``min_lr_ratio``,
``calibration_steps``), weight decay, clipping, precision (the autocast mode resolved for the device), seed,
sampling, hard negatives, loss settings, clip and image augmentation, recipe, EMA, freezing, curriculum,
``cache_max_mb`` (it decides whether the data is cached or streamed, and the two draw batches through
different sources) and PowerSGD. ``video_diff_init`` defines a run only where the run inflates its video path
from its image path (``inflates``: ``--video-init image``, or ``auto`` choosing to); elsewhere it is recorded
as None, so it never blocks a run that does not use it. A state saved before the field existed and whose run
inflated started the frame differences at zero (the only start there was then): it counts as ``"zero"``, so
resuming it needs ``--video-diff-init zero``.

Safe to change (not recorded): ``out`` (a run folder may move), ``resume``, ``progress``, ``log_every``,
``num_workers``, ``threads``, ``decode_cache`` (decoded data is keyed by content), ``checkpoint_every`` /
``checkpoint_minutes``, the held-out sets and their evaluation (``val_pairs``, ``val_videos``, ``eval_every``,
``eval_max_pairs``: evaluation draws no random numbers and changes no weight), and ``minutes``: it is a
wall-clock allowance for the process that runs, while the schedule's length is in the saved state
(``max_steps``, or the length fitted to a time budget).

``max_steps`` is the cosine schedule's length: another value gives every later step another LR, so the run
would be neither the saved one nor the new one, and it is refused. The one exception is a *larger*
``max_steps`` when the LR after warm-up is flat (``min_lr_ratio`` 1) and nothing else is
derived from it (no curriculum sized by it, no few-shot recipe choosing from it): the steps already taken
are then exactly those of a run started with the larger value, and the resumed run extends its schedule.

World size, ``parallel`` and ``expert_parallel`` are recorded but may change (the state holds the full
single-process model and optimiser, the global batch is the same): a resume warns that the run is then the
same run at another layout, equal to an unbroken one up to float reduction order, not bit for bit.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from ernie_vl.train import checkpointing as ckpt

#: the entry of the training state that holds the run's defining settings
FINGERPRINT_KEY = "fingerprint"

#: TrainConfig fields that may change on resume without changing the numbers (see the module docstring)
SAFE_FIELDS = frozenset({"out", "resume", "progress", "log_every", "num_workers", "threads", "decode_cache",
                         "checkpoint_every", "checkpoint_minutes", "val_pairs", "val_videos", "eval_every",
                         "eval_max_pairs", "minutes"})
#: recorded, and a change only warns: the state loads at any process count and sharding
LAYOUT_FIELDS = ("world_size", "parallel", "expert_parallel")


def path_identity(path: str, out: str | Path) -> dict[str, Any]:
    """A cheap identity of a data path: its absolute path and its path relative to the run folder ``out``; a
    file's size and mtime; a folder's (or a shard pattern's, ``a/{000..009}.tar``) file count, total size and
    newest mtime (one listing, nothing read). A path that does not exist has its paths only (the trainer
    names it when it reads it)."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    ident: dict[str, Any] = {"path": str(p), "from_out": os.path.relpath(p, os.path.abspath(out))}
    if p.is_file():
        st = p.stat()
        return {**ident, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.is_dir():
        files = [os.path.join(root, name) for root, _, names in os.walk(p) for name in names]
    elif "{" in str(p):
        from ernie_vl.data.shards import expand_braces

        files = [f for f in expand_braces(str(p)) if os.path.isfile(f)]
    else:
        return ident
    stats = [os.stat(f) for f in files]
    return {**ident, "files": len(stats), "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


def same_setting(saved: Any, now: Any) -> bool:
    """Equal settings; a data path counts as the same when only its absolute path changed while its place
    relative to the run folder and its identity did not (the run folder moved together with its data)."""
    if isinstance(saved, list) and isinstance(now, list):
        return len(saved) == len(now) and all(same_setting(a, b) for a, b in zip(saved, now))
    if isinstance(saved, dict) and isinstance(now, dict) and "from_out" in saved and "from_out" in now:
        where = ("path", "from_out")
        same_identity = {k: v for k, v in saved.items() if k not in where} == \
            {k: v for k, v in now.items() if k not in where}
        return same_identity and any(saved[k] == now[k] for k in where)
    return saved == now


def _model_identity(model: str, out: str | Path) -> Any:
    """A preset name as given; a checkpoint folder as its weights' digest (without one: path, size, mtime)."""
    path = Path(model)
    if not (path / "config.json").is_file():
        return model
    from ernie_vl.checkpoint import WEIGHTS_NAME, read_header

    weights = path / WEIGHTS_NAME
    digest = (read_header(weights).get("__metadata__") or {}).get("sha256") if weights.is_file() else None
    if digest:  # the same weights wherever the folder is
        return {"checkpoint_sha256": digest}
    return {"checkpoint": os.path.abspath(path), "weights": path_identity(str(weights), out)}


def inflates(cfg) -> bool:
    """Whether the run ``cfg`` (a ``TrainConfig``) starts its video path from its image path: a checkpoint
    folder as ``model``, videos, and ``video_init`` "image", or "auto" deciding to (``finetune.video_start``
    on the checkpoint's header and config, nothing else read)."""
    path = Path(cfg.model)
    if not cfg.videos or cfg.video_init == "keep" or not (path / "config.json").is_file():
        return False
    if cfg.video_init == "image":
        return True
    from ernie_vl.checkpoint import read_config
    from ernie_vl.train.finetune import INFLATED, has_video_stem, trained_on, video_start

    return video_start(cfg.video_init, True, trained_on(path), has_video_stem(read_config(path))) == INFLATED


def train_fingerprint(cfg, world_size: int = 1, device_type: str = "cpu") -> dict[str, Any]:
    """The defining settings of the run ``cfg`` (a ``TrainConfig``) at ``world_size`` processes on
    ``device_type``; JSON-ready, saved in its state."""
    values = cfg.to_dict()
    fp: dict[str, Any] = {k: v for k, v in values.items() if k not in SAFE_FIELDS}
    fp["model"] = _model_identity(cfg.model, cfg.out)
    fp["pairs"] = [path_identity(p, cfg.out) for p in cfg.pairs]
    fp["videos"] = [path_identity(v, cfg.out) for v in cfg.videos]
    fp["batch_pairs"] = cfg.batch_pairs if cfg.pairs else 0
    fp["batch_videos"] = cfg.batch_videos if cfg.videos else 0
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device_type == "cuda")
    fp["autocast"] = "bf16" if use_bf16 else "none"
    fp["world_size"] = world_size
    fp["video_diff_init"] = cfg.video_diff_init if inflates(cfg) else None
    return fp


def differences(saved: dict[str, Any], now: dict[str, Any], skip: Iterable[str] = ()) -> list[str]:
    """``"lr 0.001 then, 0.002 now"`` for every key of ``now`` (and of ``saved``) whose values differ."""
    skip = set(skip)
    keys = list(now) + [k for k in saved if k not in now]
    return [f"{k} {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys
            if k not in skip and not same_setting(saved.get(k), now.get(k))]


def read_saved(out: str | Path, key: str) -> Any:
    """The ``key`` entry of the state saved in ``out`` (header only), or None when there is no state or entry."""
    return ckpt.read_state_entry(out, key) if ckpt.has_training_state(out) else None


def max_steps_extension(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """True when ``now`` has a larger ``max_steps`` than ``saved`` that changes no step's LR."""
    if not (isinstance(saved.get("max_steps"), int) and isinstance(now.get("max_steps"), int)):
        return False
    flat = now.get("min_lr_ratio") == 1.0  # the LR after warm-up does not depend on the length
    derived = (now.get("curriculum") and now.get("curriculum_steps") is None) or (
        now.get("recipe") == "auto" and bool(now.get("videos")))
    return now["max_steps"] > saved["max_steps"] and flat and not derived


def _defaults_for(fingerprint: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``TrainConfig``'s defaults of the settings in ``fingerprint`` that ``saved`` lacks (fields added since)."""
    import dataclasses

    from ernie_vl.train.config import TrainConfig

    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    return {k: defaults[k] for k in fingerprint if k not in saved and k in defaults}


def check_training_resume(out: str | Path, fingerprint: dict[str, Any]) -> bool:
    """Before a resumed run is built: ``ValueError`` naming every defining setting that differs from the state
    saved in ``out``; a warning when only the layout (process count, sharding) changed, or when the state
    predates the fingerprint. Returns True when a larger ``max_steps`` extends a flat schedule."""
    saved = read_saved(out, FINGERPRINT_KEY)
    if saved is None:
        warnings.warn(f"--resume: the training state in {str(out)!r} was saved before runs recorded their "
                      f"settings; this run's settings cannot be checked against it (resuming as given)",
                      stacklevel=4)
        return False
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: the training state in {str(out)!r} records its settings as "
                         f"{type(saved).__name__}, not a dict; it cannot be checked. Use a new --out")
    # before video_diff_init was recorded, an inflating run started the frame differences at zero
    legacy = {"video_diff_init": "zero" if fingerprint.get("video_diff_init") is not None else None}
    saved = {**_defaults_for(fingerprint, saved), **legacy, **saved}
    extend = max_steps_extension(saved, fingerprint)
    diffs = differences(saved, fingerprint, skip=LAYOUT_FIELDS + (("max_steps",) if extend else ()))
    if diffs:
        raise ValueError(
            f"--resume: the run saved in {str(out)!r} was started with other settings: {'; '.join(diffs)}. "
            f"A resumed run continues exactly only with the settings it was started with: rerun with those, or "
            f"start a new run with these settings in a new --out (to continue from its weights, give "
            f"--model {str(Path(out) / 'final')!r} once it has finished)")
    layout = differences(saved, fingerprint, skip=[k for k in fingerprint if k not in LAYOUT_FIELDS])
    if layout:
        warnings.warn(f"--resume: resuming at another layout ({'; '.join(layout)}): the same run with the same "
                      f"global batch and schedule, equal to an unbroken one up to float reduction order, not bit "
                      f"for bit", stacklevel=4)
    return extend
