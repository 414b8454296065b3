"""Named model presets: JSON files in ``ernie_vl/preset_configs/`` loaded into ``ErnieVLConfig``.

- ``test``: unit tests only (well under 1M parameters; 32 px images, 4-frame clips, a
  1000-id folded vocabulary and 16-token context, see ``TextConfig``).
- ``tiny``: trains in minutes on 2 CPU cores (32 px images, patch 4, and 8-frame 32 px clips,
  4-frame x 8 px tubelets, both embedded by conv tokenizers, the video one fed frame differences;
  2-layer 128-wide backbone with 4 experts top-2, 32-token context).
- ``ernie45-tiny``: ``tiny``'s encoders (conv tokenizers included) with the backbone and aligners built
  the ERNIE 4.5 VL way: text and vision expert groups with their own routers at ERNIE's 3:1 width
  ratio (SwiGLU, 192 / 64), a shared expert, score-bias (aux-loss-free) balancing next to a small
  load-balance loss, and the variable-resolution resampler as the aligner of images and clips.
- ``base``: ViT-B/16 image and space-time video encoders, 12-layer 512-wide backbone,
  8 experts top-2 in every second block.
- ``large``: ViT-L/14 encoders, 24-layer 768-wide backbone, 16 experts top-2.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ernie_vl.config import ErnieVLConfig, merge_overrides

PRESET_FOLDER = "preset_configs"


def _preset_files() -> dict[str, Any]:
    folder = resources.files("ernie_vl") / PRESET_FOLDER
    return {p.name[: -len(".json")]: p for p in folder.iterdir() if p.name.endswith(".json")}


def list_models() -> list[str]:
    """Preset names, smallest first (``["test", "tiny", "ernie45-tiny", "base", "large"]``)."""
    order = {"test": 0, "tiny": 1, "ernie45-tiny": 2, "base": 3, "large": 4}
    return sorted(_preset_files(), key=lambda n: (order.get(n, len(order)), n))


def preset_dict(name: str) -> dict[str, Any]:
    """The raw JSON data of a preset; unknown names raise ``ValueError`` listing the valid ones."""
    files = _preset_files()
    if not isinstance(name, str) or name not in files:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(list_models())}")
    return json.loads(files[name].read_text())


def load_config(name: str, **overrides: Any) -> ErnieVLConfig:
    """The ``ErnieVLConfig`` of preset ``name`` with ``overrides`` applied.

    Overrides are top-level fields (``num_classes=8``, ``class_names=[...]``) or
    sections given as dicts that merge into the preset's
    (``backbone={"moe": {"num_experts": 8}}``); unknown keys raise ``ValueError``.
    """
    data = merge_overrides(preset_dict(name), overrides)
    return ErnieVLConfig.from_dict(data)


def create_model(name: str, max_params: int | None = None, **overrides: Any):
    """A randomly initialised ``ErnieVL`` from preset ``name`` (see ``load_config`` for overrides).

    Every field is validated and the parameter count checked against ``max_params``
    (``ernie_vl.limits``) before anything is allocated.
    """
    from ernie_vl.model import ErnieVL

    return ErnieVL(load_config(name, **overrides), max_params=max_params)
