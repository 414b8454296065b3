"""Where the demo's files go, and the trained model loaded once and shared by the stages of one run."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ernie_vl.app.demo.config import DemoConfig


@dataclass
class Workspace:
    """The demo's output folder layout (every path absolute) and a lazily loaded model.

    ``DIR/data/shapes`` (train/val/heldout CSVs + PNGs), ``DIR/data/motion/{train,val}``
    (``<class>/<clip>.mp4`` + prompts.json), ``DIR/train`` (the trainer's folder: log,
    resume state), ``DIR/model`` (the trained checkpoint), ``DIR/index`` (FAISS index of the
    held-out images), ``DIR/actions`` (evaluation files), the PNGs and the reports at the top.
    """

    cfg: DemoConfig
    _models: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        return self.cfg.out_dir.resolve()

    @property
    def shapes_dir(self) -> Path:
        return self.root / "data" / "shapes"

    @property
    def motion_dir(self) -> Path:
        return self.root / "data" / "motion"

    def csv(self, split: str) -> Path:
        return self.shapes_dir / f"{split}.csv"

    def videos(self, split: str) -> Path:
        return self.motion_dir / split

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def actions_dir(self) -> Path:
        return self.root / "actions"

    def figure(self, name: str) -> Path:
        return self.root / name

    def rel(self, path: Path | str) -> str:
        """``path`` relative to the output folder when inside it (for the report), else as given."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def model(self, quantized: bool = False) -> Any:
        """The trained model from ``DIR/model`` in eval mode (loaded once per run)."""
        key = "int8" if quantized else "fp32"
        if key not in self._models:
            if quantized:
                from ernie_vl import quantize_int8

                self._models[key] = quantize_int8(self.model())
            else:
                from ernie_vl import ErnieVL

                self._models[key] = ErnieVL.from_pretrained(self.model_dir).eval()
        return self._models[key]

    def forget_models(self) -> None:
        self._models.clear()


def read_captions(csv_path: Path) -> tuple[list[Path], list[str]]:
    """(image paths, captions) of a ``filepath,caption`` CSV, paths resolved against its folder."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"captions CSV {str(csv_path)!r} has no rows")
    paths = [csv_path.parent / r["filepath"] for r in rows]
    return paths, [r["caption"] for r in rows]


def list_videos(root: Path) -> list[tuple[Path, str]]:
    """(path, class) of every ``ROOT/<class>/*.mp4``, sorted."""
    items = sorted((p, p.parent.name) for p in root.glob("*/*.mp4"))
    if not items:
        raise ValueError(f"no videos found under {str(root)!r} (expected ROOT/<class>/<file>.mp4)")
    return items

