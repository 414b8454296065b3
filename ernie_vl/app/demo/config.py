"""What the demo does and how big: one typed dataclass, with the default (~10 min) and quick (~1-2 min) sizes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoConfig:
    """Sizes and settings of one demo run.

    train_minutes: wall-clock budget of the training stage, loading the data included (the
        other stages add about 2-3 minutes on 2 CPU cores at the default sizes).
    max_train_steps: an upper bound on optimizer steps (0 = only the time budget).
    num_*: synthetic data sizes (images per split; motion clips per class and split).
    text_queries: captions searched in the index (empty = pick ``num_text_queries``
        held-out captions, whose true image is known, plus one free-form query).
    num_videos: videos classified one by one in the classify stage.
    """

    out_dir: Path = Path("runs/demo")
    model: str = "tiny"
    seed: int = 0
    train_minutes: float = 7.0
    max_train_steps: int = 0
    batch_pairs: int = 0               # image-text pairs per step (0 = the trainer's default)
    batch_videos: int = 0              # clips per step (0 = the trainer's default)
    lr: float = 5e-4                   # peak learning rate (as bench/train_synthetic.py)
    warmup_steps: int = 20             # learning-rate warm-up steps (0 = the trainer's default)
    eval_every: int = 50               # held-out evaluation every N steps (0 = only at the end)
    checkpoint_every: int = 50         # resume state every N steps (an interrupted run resumes)
    # synthetic data
    num_train_images: int = 4000
    num_val_images: int = 200
    num_heldout_images: int = 200
    image_size: int = 0                # picture side in pixels (0 = the preset's image size)
    num_train_clips_per_class: int = 64
    num_val_clips_per_class: int = 16
    num_frames: int = 8
    video_size: int = 0                # clip frame side in pixels (0 = the preset's video size)
    # evaluation and search
    eval_batch_size: int = 64
    num_text_queries: int = 3
    free_text_queries: tuple[str, ...] = ("a large red circle",)
    top_k: int = 5
    num_videos: int = 8
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.train_minutes <= 0:
            raise ValueError(f"train_minutes must be > 0, got {self.train_minutes}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("num_train_images", "num_heldout_images", "num_train_clips_per_class",
                     "num_val_clips_per_class", "eval_batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "batch_pairs", "batch_videos", "warmup_steps", "eval_every",
                     "checkpoint_every", "num_val_images", "num_text_queries", "num_videos", "image_size",
                     "video_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.free_text_queries = tuple(str(q) for q in self.free_text_queries)

    @classmethod
    def quick(cls, out_dir: Path | str = Path("runs/demo-quick"), **overrides) -> "DemoConfig":
        """A ~1-2 minute run on 2 cores (small data, a short training): for tests and a first look."""
        sizes = dict(out_dir=Path(out_dir), train_minutes=2.0, max_train_steps=40, batch_pairs=32, batch_videos=16,
                     warmup_steps=5, eval_every=20, num_train_images=600, num_val_images=40, num_heldout_images=60,
                     num_train_clips_per_class=12, num_val_clips_per_class=3, num_text_queries=2, num_videos=4)
        sizes.update(overrides)
        return cls(**sizes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["free_text_queries"] = list(self.free_text_queries)
        return d

    def data_params(self) -> dict:
        """The settings that decide the synthetic data (its stage reruns when one changes)."""
        keys = ("seed", "num_train_images", "num_val_images", "num_heldout_images", "num_train_clips_per_class",
                "num_val_clips_per_class", "num_frames")
        return {**{k: getattr(self, k) for k in keys}, **self.pixel_sizes()}

    def pixel_sizes(self) -> dict:
        """``{"image_size", "video_size"}``: the given sides, or the model preset's (videos rounded up to even)."""
        image, video = self.image_size, self.video_size
        if not image or not video:
            from ernie_vl.presets import load_config

            preset = load_config(self.model)
            side = lambda s: int(s[0] if isinstance(s, (tuple, list)) else s)  # noqa: E731
            image = image or max(16, side(preset.image_encoder.image_size))
            video = video or max(16, side(preset.video_encoder.image_size))
        return {"image_size": image, "video_size": video + video % 2}

    def train_params(self) -> dict:
        keys = ("model", "seed", "train_minutes", "max_train_steps", "batch_pairs", "batch_videos", "lr",
                "warmup_steps", "eval_every")
        return {k: getattr(self, k) for k in keys}

