"""The starting point of the few-shot bench's ``pairs_*`` rows: ``tiny`` trained on image-text pairs only.

``pair_checkpoint(work, steps, seed)`` trains ``tiny`` (the preset, random init) on synthetic captioned shapes
(``ernie_vl.data.synthetic.make_shapes``: 3000 training images at 32 px, retrieval evaluated on its 200 ``val``
pairs) for a fixed number of optimiser steps with ``seed``, no videos, and caches the checkpoint in the work
folder (``pairs_tiny_{steps}_{seed}/final``), so every row of one seed starts from the same weights. An
interrupted stage resumes from its saved state; a finished one is reused. Its record (steps, seed, data,
seconds, the held-out retrieval it reached) goes into every row that starts from it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

SHAPES = dict(num_train=3000, num_val=200, num_heldout=0, image_size=32)  # make_shapes settings, seed 0
RECORD = "pair_stage.json"


def shapes_data(work: Path) -> Path:
    """The captioned shapes (``train.csv``, ``val.csv``), drawn once into ``work/shapes_32`` and reused."""
    from ernie_vl.data.synthetic import make_shapes

    root = Path(work) / "shapes_32"
    done = root / "done.json"
    if not done.is_file():  # make_shapes is deterministic: an interrupted draw is redrawn whole
        make_shapes(root, **SHAPES)
        done.write_text(json.dumps(SHAPES) + "\n")
    return root


def pair_checkpoint(work: Path, steps: int, seed: int, threads: int | None = None,
                    progress: bool = False) -> tuple[Path, dict]:
    """(checkpoint folder, its record) of ``tiny`` trained ``steps`` steps on pairs with ``seed``, cached."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"pair-training steps must be an int >= 1, got {steps!r}")
    folder = Path(work) / f"pairs_tiny_{steps}_{seed}"
    record_file, final = folder / RECORD, folder / "final"
    if record_file.is_file() and (final / "config.json").is_file():
        return final, json.loads(record_file.read_text())
    from ernie_vl.train import TrainConfig
    from ernie_vl.train.checkpointing import CHECKPOINT_NAME
    from ernie_vl.train.trainer import Trainer

    data = shapes_data(work)
    if folder.exists() and not (folder / CHECKPOINT_NAME).is_file():
        shutil.rmtree(folder)  # stopped before its first saved state: nothing to resume, start again
    t0 = time.perf_counter()
    result = Trainer(TrainConfig(out=str(folder), model="tiny", pairs=[str(data / "train.csv")],
                                 val_pairs=str(data / "val.csv"), max_steps=steps, minutes=None, seed=seed,
                                 num_workers=1, threads=threads, progress=progress, decode_cache=None,
                                 resume=(folder / CHECKPOINT_NAME).is_file())).run()
    if result.steps != steps:
        raise RuntimeError(f"the pair stage stopped at step {result.steps} of {steps} ({folder})")
    record = {"model": "tiny", "steps": result.steps, "seed": seed,
              "data": f"synthetic captioned shapes, {SHAPES['num_train']} images at {SHAPES['image_size']} px",
              "train_s": round(result.seconds, 1), "total_s": round(time.perf_counter() - t0, 1),
              "evaluation": {k: round(v, 4) for k, v in result.evaluation.items() if isinstance(v, float)}}
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return final, record


def inflated_checkpoint(checkpoint: Path, diff_init: str) -> Path:
    """``checkpoint`` with its video path inflated from its image path (``ernie_vl.inflate.inflate_video_from_image``
    with ``diff_init``), saved once beside it (``final_image_<diff_init>``): a row fine-tunes it with
    ``--video-init keep``, for an inflation the trainer's ``--video-init image`` does not offer."""
    out = Path(checkpoint).parent / f"final_image_{diff_init}"
    if not (out / "config.json").is_file():
        from ernie_vl.inflate import inflate_video_from_image
        from ernie_vl.model import ErnieVL

        inflate_video_from_image(ErnieVL.from_pretrained(checkpoint), diff_init=diff_init).save_pretrained(out)
    return out
