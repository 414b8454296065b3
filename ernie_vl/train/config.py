"""Typed training configuration (``TrainConfig``) and the result of a run (``TrainResult``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from encoders.convert import DEFAULT_DIFF_INIT, check_diff_init

AUTOCAST_MODES = ("auto", "bf16", "none")
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything one training run needs. Sizes of batches are *global* (all ranks together).

    Data: ``pairs`` image-text CSVs (``filepath,caption``; column names settable),
    ``videos`` labelled video folders (``ROOT/<class>/<file>``) or CSVs (``path,label``).
    ``video_text``: also train video <-> class-prompt contrastive pairs (prompts from
    ``ROOT/prompts.json`` when present, else ``video_prompt_template``), which is what
    zero-shot classification uses.
    Mix per step: ``batch_pairs`` image-text pairs and ``batch_videos`` clips.
    Length: ``max_steps`` and/or ``minutes`` (wall-clock budget; the cosine schedule's length is
    then fitted to the step time measured over the first ``calibration_steps`` and re-fitted
    at 2x, 4x, ... those steps, continuously: the LR never jumps).
    Data loading: datasets whose decoded size is under ``cache_max_mb`` are decoded once
    (with ``num_workers`` processes) and kept in memory as uint8; larger ones stream
    through DataLoader workers. ``decode_cache``: folder where decoded data is kept (images:
    a memory-mapped uint8 file; clips: a tensor file) keyed by the CSV content, the files'
    sizes and mtimes and the transform (None: in RAM), so a second run on the same data
    skips decoding and an interrupted decode resumes.
    Sampling: ``sampler`` (image-text pairs) and ``video_sampler`` (clips; None: as ``sampler``),
    each ``uniform`` (shuffled epochs) or ``priority`` (loss-priority, BRIEF.md #6, see
    ``sampler.py``). Defaults from the synthetic screens (BENCHMARKS.md): uniform for pairs,
    where priority sampling lowered held-out Recall@1, priority for clips, where it raised top-1.
    ``hard_negative_share``: fraction of each image-text batch made of caption-neighbour groups
    of ``hard_negative_group`` (in-batch hard negatives, see ``hard_negatives.py``; 0 = off).
    ``caption_positives``: pairs with identical captions in a global batch are positives of each other
    (``LossConfig.caption_positives``; None: the model's setting, off by default; False: plain pairs).
    Clip augmentation (``ernie_vl.data.clip_augment``): a horizontal flip / time reversal relabelled
    through class maps declared in ``ROOT/augment.json`` and / or ``hflip_map`` / ``reverse_map`` /
    ``no_hflip`` / ``no_reverse`` here (a field given here replaces the file's entry; nothing declared:
    no flips), with probabilities ``p_hflip`` / ``p_reverse``; ``temporal_jitter`` (TSN offsets over
    clips cached with twice the frames), ``speed_min`` < 1 (frame-rate jitter: a random span of
    ``speed_min``..1 of the clip), ``crop_min_area`` < 1 (random resized crops of the cached clips),
    ``mixup`` / ``cutmix`` (Beta alphas; 0 = off).
    Image augmentation for image-text pairs (``ernie_vl.data.image_augment``), on the step's batch:
    ``image_crop_min_area`` < 1 (a random resized crop per image covering at least that share of it,
    as open_clip's ``RandomResizedCrop(scale=(0.9, 1))``) and ``image_rotate`` > 0 (a uniform random
    rotation within +-that many degrees); defaults: off.
    Few-shot recipe (``recipe.py``, off by default: on the few-shot bench it has scored below plain
    training so far): ``recipe="auto"`` fills the fields left None here
    (``temporal_jitter``, ``speed_min``, ``crop_min_area``, ``weight_decay``, ``label_smoothing``, ``drop_path`` of the
    video encoder, ``ema`` decay (0 = off), ``epochs`` (a cap on passes over the clips), ``freeze``
    ("none" | "backbone": linear probe)) from the number of clips per class; ``"off"`` fills them with
    the plain defaults. ``video_init``: ``"auto"`` starts the video path from the image path
    (``ernie_vl.inflate``) when the checkpoint given as ``model`` was trained on pairs but never on
    videos; ``"image"`` always does; ``"keep"`` never does. ``video_diff_init``: where an inflated video stem's
    frame-difference inputs start, ``"pixels"`` (the default: at the pixels' weights) or ``"zero"`` (blind to
    motion at the start; what ``--video-init image`` did before ``"pixels"`` became the default).
    Distributed: ``parallel`` ``ddp`` (default) or ``fsdp``; ``powersgd_rank`` > 0 registers
    PowerSGD (DDP only) after ``powersgd_warmup`` uncompressed steps; ``expert_parallel`` E > 1
    spreads every MoE layer's experts over groups of E ranks (:mod:`ernie_vl.moe.expert_parallel`).
    ``threads``: torch threads per process; None picks all CPUs, or 1 on an oversubscribed machine.
    Checkpoints (``OUT/train_state.safetensors``, exact resume): every ``checkpoint_minutes``
    of training (default 5; 0 or None: off) and/or every ``checkpoint_every`` steps (0: off),
    and always at the end. ``resume`` continues from it; without one it warns and starts at
    step 0, unless the folder already holds a run (a log or ``final/``), which it refuses; a saved run
    whose defining settings differ from these is refused before any data is decoded
    (:mod:`ernie_vl.train.run_settings` says which fields may change).
    """

    out: str = "runs/train"
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    pairs: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    image_col: str = "filepath"
    caption_col: str = "caption"
    val_pairs: Optional[str] = None
    val_videos: Optional[str] = None
    video_text: bool = True
    video_prompt_template: str = "a video of {}"
    num_frames: Optional[int] = None

    batch_pairs: int = 64
    batch_videos: int = 32
    max_steps: Optional[int] = None
    minutes: Optional[float] = None
    calibration_steps: int = 5
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    weight_decay: Optional[float] = None
    warmup_steps: int = 50
    grad_clip: float = 1.0
    autocast: str = "auto"
    seed: int = 0

    sampler: str = "uniform"
    video_sampler: Optional[str] = "priority"
    priority_alpha: float = 1.0
    priority_eps: float = 0.05
    priority_uniform_mix: float = 0.3
    priority_ema: float = 0.0
    priority_relative: bool = False
    hard_negative_share: float = 0.0
    hard_negative_group: int = 4
    hard_negative_pool: int = 2048
    caption_positives: Optional[bool] = None

    hflip_map: Optional[dict[str, str]] = None
    reverse_map: Optional[dict[str, str]] = None
    no_hflip: list[str] = field(default_factory=list)
    no_reverse: list[str] = field(default_factory=list)
    p_hflip: float = 0.5
    p_reverse: float = 0.5
    temporal_jitter: Optional[bool] = None
    speed_min: Optional[float] = None
    crop_min_area: Optional[float] = None
    mixup: float = 0.0
    cutmix: float = 0.0
    image_crop_min_area: float = 1.0
    image_rotate: float = 0.0

    recipe: str = "off"
    label_smoothing: Optional[float] = None
    drop_path: Optional[float] = None
    ema: Optional[float] = None
    epochs: Optional[float] = None
    freeze: Optional[str] = None
    video_init: str = "auto"
    video_diff_init: str = DEFAULT_DIFF_INIT

    curriculum: bool = False
    curriculum_steps: Optional[int] = None

    num_workers: int = 2
    cache_max_mb: float = 2048.0
    decode_cache: Optional[str] = "~/.cache/ernie_vl/decoded"
    log_every: int = 1
    eval_every: int = 0
    eval_max_pairs: int = 1000
    checkpoint_every: int = 0
    checkpoint_minutes: Optional[float] = 5.0
    resume: bool = False
    progress: bool = True

    parallel: str = "ddp"
    powersgd_rank: int = 0
    powersgd_warmup: int = 10
    expert_parallel: int = 1
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        self.pairs = [str(p) for p in ([self.pairs] if isinstance(self.pairs, (str, Path)) else self.pairs)]
        self.videos = [str(p) for p in ([self.videos] if isinstance(self.videos, (str, Path)) else self.videos)]
        if not self.pairs and not self.videos:
            raise ValueError("nothing to train on: give pairs (image-text CSVs) and/or videos (folders or CSVs)")
        if self.max_steps is None and self.minutes is None:
            raise ValueError("give max_steps and/or minutes to bound the run")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {self.max_steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        for name in ("batch_pairs", "batch_videos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pairs and self.batch_pairs < 2:
            raise ValueError(f"batch_pairs must be >= 2 for a contrastive loss, got {self.batch_pairs}")
        if self.videos and self.batch_videos < 1:
            raise ValueError(f"batch_videos must be >= 1 when videos are given, got {self.batch_videos}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0 (steps; 0 = off), got {self.checkpoint_every!r}")
        if self.checkpoint_minutes is not None and not 0 <= self.checkpoint_minutes < float("inf"):
            raise ValueError(f"checkpoint_minutes must be >= 0 (0 or None = off), got {self.checkpoint_minutes!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"unknown autocast {self.autocast!r}; valid: {list(AUTOCAST_MODES)}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {self.parallel!r}; valid: {list(PARALLEL_MODES)}")
        if not isinstance(self.expert_parallel, int) or self.expert_parallel < 1:
            raise ValueError(f"expert_parallel must be an integer >= 1 (ranks per expert group), got {self.expert_parallel!r}")
        if self.expert_parallel > 1 and self.parallel == "fsdp":
            raise ValueError("expert_parallel > 1 runs with parallel='ddp' (the experts are already spread over "
                             "ranks; FSDP would shard them a second time); use --parallel ddp")
        if self.powersgd_rank < 0:
            raise ValueError(f"powersgd_rank must be >= 0, got {self.powersgd_rank}")
        if self.powersgd_rank and self.parallel == "fsdp":
            raise ValueError("PowerSGD is a DDP communication hook and cannot be used with FSDP "
                             "(FSDP reduce-scatters sharded gradients); use parallel='ddp' or powersgd_rank=0")
        for name in ("sampler", "video_sampler"):
            value = getattr(self, name)
            if value not in ("priority", "uniform") and not (name == "video_sampler" and value is None):
                raise ValueError(f"unknown {name} {value!r}; valid: ['priority', 'uniform']")
        if not 0.0 <= self.hard_negative_share <= 1.0:
            raise ValueError(f"hard_negative_share must be in [0, 1], got {self.hard_negative_share}")
        if self.hard_negative_group < 2 or self.hard_negative_pool < self.hard_negative_group:
            raise ValueError(f"need hard_negative_group >= 2 and hard_negative_pool >= group, got group="
                             f"{self.hard_negative_group}, pool={self.hard_negative_pool}")
        for name in ("p_hflip", "p_reverse"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.crop_min_area is not None and not 0.0 < self.crop_min_area <= 1.0:
            raise ValueError(f"crop_min_area must be in (0, 1] (1 = no crops), got {self.crop_min_area}")
        from ernie_vl.data.image_augment import ImageAugmentConfig

        ImageAugmentConfig(self.image_crop_min_area, self.image_rotate)  # raises on a value out of range
        if self.speed_min is not None and not 0.0 < self.speed_min <= 1.0:
            raise ValueError(f"speed_min must be in (0, 1] (1 = no frame-rate jitter), got {self.speed_min}")
        if self.recipe not in ("auto", "off"):
            raise ValueError(f"unknown recipe {self.recipe!r}; valid: ['auto', 'off']")
        if self.freeze not in (None, "none", "backbone"):
            raise ValueError(f"unknown freeze {self.freeze!r}; valid: ['none', 'backbone']")
        if self.video_init not in ("auto", "image", "keep"):
            raise ValueError(f"unknown video_init {self.video_init!r}; valid: ['auto', 'image', 'keep']")
        check_diff_init(self.video_diff_init, "video_diff_init")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema (decay) must be in [0, 1), 0 = off; got {self.ema}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {self.mixup} and {self.cutmix}")
        if "{}" not in self.video_prompt_template:
            raise ValueError(f"video_prompt_template needs a '{{}}' for the class name, got {self.video_prompt_template!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`ernie_vl.train.train` returns."""

    final_dir: Path
    steps: int
    seconds: float
    samples_per_s: float
    last_losses: dict[str, float]
    evaluation: dict[str, float]
    routing: dict[str, Any]
    log_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
