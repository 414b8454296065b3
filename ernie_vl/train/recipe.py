"""The few-shot recipe: training settings picked from the number of labelled clips per class.

``choose_recipe(clips_per_class, ...)`` returns a :class:`Recipe` (every setting and why); the
trainer applies it to the fields the user left unset (``None`` in ``TrainConfig``) and writes it
to ``setup.json`` and the first log record. With ``recipe="off"`` unset fields take the
plain defaults (:data:`PLAIN`), which are the behaviour before the recipe existed.

The rules (n = median labelled clips per class):

- clip augmentation: temporal jitter (TSN offsets) for n <= 1024; frame-rate jitter (a random
  80-100% span of the clip) and random resized crops (at least 60% of the frame, the same box in
  every frame) for n <= 256; flips and reversals only as the data declares them;
- regularisation: label smoothing 0.2 and weight decay 0.1 for n <= 64 (0.1 / 0.05 above);
  drop-path 0.1 in the video encoder for n <= 128;
- length: at most ``epochs`` passes over the clips (400 for n <= 64, 200 for n <= 256, no cap
  above): the cap only binds when the time budget would allow more;
- EMA of the weights (decay 0.998) for n <= 256 when the run is long enough (>= 1000 steps);
- ``freeze="backbone"`` (a linear probe on frozen features, the head started from the class
  prompts' text embeddings) for n <= 8 when fine-tuning a checkpoint with trained weights.

These are heuristics from the usual practice of few-shot video fine-tuning; ``bench/few_shot_video.py``
measures the recipe against no augmentation on 40 and 512 clips per class.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

PLAIN: dict[str, Any] = {"temporal_jitter": False, "speed_min": 1.0, "crop_min_area": 1.0, "label_smoothing": None, "weight_decay": 0.05,
                         "drop_path": 0.0, "ema": 0.0, "epochs": None, "freeze": "none"}
RECIPES = ("auto", "off")


@dataclass
class Recipe:
    """Chosen settings (``None`` label smoothing: the model's own) and the reason for each."""

    clips_per_class: float
    temporal_jitter: bool
    speed_min: float
    crop_min_area: float
    label_smoothing: Optional[float]
    weight_decay: float
    drop_path: float
    ema: float
    epochs: Optional[float]
    freeze: str
    why: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_recipe(clips_per_class: float, pretrained: bool = False, expected_steps: Optional[int] = None,
                  mode: str = "auto") -> Recipe:
    """Settings for ``clips_per_class`` labelled clips per class (see the module docstring).

    ``pretrained``: fine-tuning a checkpoint with trained visual weights. ``expected_steps``: the
    run's step budget when known (None: unknown, e.g. a pure time budget; EMA then stays on)."""
    if mode not in RECIPES:
        raise ValueError(f"unknown recipe {mode!r}; valid: {list(RECIPES)}")
    n = float(clips_per_class)
    if mode == "off":
        return Recipe(n, **PLAIN, why={"all": "recipe off: the plain defaults"})
    why: dict[str, str] = {}
    jitter = n <= 1024
    why["temporal_jitter"] = f"{n:g} clips/class {'<=' if jitter else '>'} 1024"
    speed = 0.8 if n <= 256 else 1.0
    why["speed_min"] = f"frame-rate jitter {'on' if speed < 1 else 'off'} ({n:g} clips/class vs 256)"
    crop = 0.6 if n <= 256 else 1.0
    why["crop_min_area"] = f"random resized crops {'on' if crop < 1 else 'off'} ({n:g} clips/class vs 256)"
    small = n <= 64
    smoothing, decay = (0.2, 0.1) if small else (0.1, 0.05)
    why["label_smoothing"] = why["weight_decay"] = f"{n:g} clips/class {'<=' if small else '>'} 64"
    drop = 0.1 if n <= 128 else 0.0
    why["drop_path"] = f"{n:g} clips/class {'<=' if drop else '>'} 128"
    epochs = 400.0 if small else (200.0 if n <= 256 else None)
    why["epochs"] = "cap on passes over the clips" if epochs else "no cap above 256 clips/class"
    long_enough = expected_steps is None or expected_steps >= 1000
    ema = 0.998 if n <= 256 and long_enough else 0.0
    why["ema"] = ("weights averaged over the last ~500 steps" if ema else
                  "off: " + ("run too short" if n <= 256 else "enough clips"))
    freeze = "backbone" if pretrained and n <= 8 else "none"
    why["freeze"] = ("linear probe: very few clips on trained features" if freeze != "none" else
                     "full fine-tuning")
    return Recipe(n, jitter, speed, crop, smoothing, decay, drop, ema, epochs, freeze, why)
