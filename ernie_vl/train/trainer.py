"""The multi-task trainer: image-text pairs + labelled videos (+ video-prompt pairs) on one ErnieVL.

``train(TrainConfig) -> TrainResult``. One optimiser step = ``grad_accum`` micro-steps,
each drawing its global mix of samples (``ernie_vl.data.mixing``) from loss-priority
samplers; AdamW with a cosine schedule and warm-up, gradient clipping, optional
autocast, optional expert curriculum, DDP (+ PowerSGD) under torchrun. Rank 0 writes
``OUT/log.jsonl`` (one line per step: loss parts, lr, samples/s, routing statistics,
measured gradient compression), ``OUT/train_state.safetensors`` (exact resume: model,
optimiser, scheduler, samplers, RNG states; safetensors + JSON, no pickle; saved every
``checkpoint_minutes`` and/or ``checkpoint_every`` steps and at the end; ``ernie_vl.train.resume``) and ``OUT/final``
(``save_pretrained``). A resumed run cuts ``log.jsonl`` back to its checkpoint's step.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ernie_vl.data.mixing import MixedSource, StepMix
from ernie_vl.moe.balance import update_score_biases
from ernie_vl.moe.expert_parallel import sync_expert_grads
from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train.config import TrainConfig, TrainResult
from ernie_vl.train.distributed import (DistContext, all_gather_cat, barrier, broadcast_object, init_distributed,
                                        unwrap, wrap_model)
from ernie_vl.train.evaluation import evaluate
from ernie_vl.train.fsdp import full_model_state
from ernie_vl.train.expert_sharding import clip_grad_norm, expert_parameter_names, plain_model, setup_expert_parallel
from ernie_vl.train.ema import ModelEMA
from ernie_vl.train.finetune import (HEAD_FROM_PROMPTS, HEAD_RANDOM, HEAD_STREAMED, INFLATED, add_drop_path, freeze,
                                     has_video_stem, init_head_from_prompts, replace_head, trained_on, video_start)
from ernie_vl.train.optim import RefittableCosine, build_optimizer
from ernie_vl.train.process import resolve_threads, seed_everything, to_device
from ernie_vl.train.reporting import routing_summary
from ernie_vl.train.resume import ResumableRun
from ernie_vl.train.run_settings import train_fingerprint
from ernie_vl.train.sampler import PrioritySampler


class Trainer(ResumableRun):
    """Holds the model, data, samplers, optimiser and schedule of one run; :meth:`run` trains."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.start_time = time.perf_counter()
        torch.set_num_threads(resolve_threads(cfg.threads))
        self.ctx: DistContext = init_distributed()
        seed_everything(cfg.seed)  # identical model initialisation on every rank
        self.out = cfg.out_dir
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.resumable = self._check_resumable() if cfg.resume else False  # fail fast, before the data
        self.run_fingerprint = train_fingerprint(cfg, self.ctx.world_size, self.ctx.device.type)
        self.extend_schedule = self._check_settings() if self.resumable else False
        self.model = self._build_model()
        self.ep = setup_expert_parallel(self.model, cfg.expert_parallel, self.ctx.world_size)
        self.settings = self._choose_settings()  # the few-shot recipe, or the plain defaults
        self._build_data()
        self._apply_settings()
        fsdp = cfg.parallel == "fsdp" and self.ctx.distributed
        # FSDP2: rank 0 keeps an unsharded copy on the CPU to save and evaluate the gathered weights
        self.fsdp_copy = copy.deepcopy(self.model) if fsdp and self.ctx.is_main else None
        self.model.to(self.ctx.device)
        # wrapped (FSDP2: sharded in place) before the optimiser is built on the parameters
        self.ddp_model, self.meter = wrap_model(self.model, self.ctx, cfg.parallel, cfg.powersgd_rank,
                                                cfg.powersgd_warmup, ignore=expert_parameter_names(self.model))
        self.fsdp = fsdp
        self.optimizer = build_optimizer(self.model, cfg.lr, self.settings["weight_decay"])
        if self.settings["ema"] and fsdp:
            raise ValueError(f"--ema {self.settings['ema']} cannot run with --parallel fsdp (FSDP2 shards the "
                             "weights the average is taken of); use --parallel ddp or --ema 0")
        self.ema = ModelEMA(self.model, self.settings["ema"]) if self.settings["ema"] else None
        # a time budget re-fits the schedule's length after the first steps (continuously: no LR jump)
        self.schedule = RefittableCosine(cfg.warmup_steps, self.max_steps or 10**9, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.curriculum = self._build_curriculum()
        self.step = 0
        self.skipped_total = 0
        self.steps_fitted = cfg.minutes is None
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        resumed = self._resume() if cfg.resume else False
        if not cfg.resume and self.ctx.is_main and (self.out / ckpt.CHECKPOINT_NAME).is_file():
            warnings.warn(f"{str(self.out)!r} holds a training state that this run (without --resume) starts "
                          f"over from step 0 and will replace; pass --resume to continue it", stacklevel=3)
        # each rank its own stream for dropout / router jitter, restored exactly on resume
        if not resumed:
            torch.manual_seed(cfg.seed * 1000 + self.ctx.rank)
        # a resumed run appends to its log (cut back to the checkpoint's step); a fresh run starts a new one
        log_path = self.out / ckpt.LOG_NAME
        if resumed and self.ctx.is_main:
            ckpt.truncate_log(log_path, self.step)
        self.log_file = open(log_path, "a" if resumed else "w", encoding="utf-8") if self.ctx.is_main else None
        self.last_checkpoint = time.perf_counter()
        if self.ctx.is_main:
            setup = self.setup_summary()
            (self.out / "setup.json").write_text(json.dumps(setup, indent=1) + "\n", encoding="utf-8")
            if cfg.progress:
                print(f"setup: {json.dumps(setup)}", flush=True)

    # ------------------------------------------------------------------ setup
    def _video_classes(self) -> Optional[list[str]]:
        """The class names of the videos; sets ``clips_per_class`` (median) and ``num_clips``."""
        self.clips_per_class, self.num_clips = 0.0, 0
        if not self.cfg.videos:
            return None
        from ernie_vl.data.sources import video_dataset

        datasets = [video_dataset(root, 2, 32, (0.5,) * 3, (0.5,) * 3, train=False) for root in self.cfg.videos]
        classes = list(datasets[0].classes)
        counts = torch.zeros(len(classes))
        for ds in datasets:
            for _, label in ds.samples:
                counts[label] += 1
        self.clips_per_class, self.num_clips = float(counts.median()), int(counts.sum())
        return classes

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        classes = self.classes = self._video_classes()
        path = Path(cfg.model)
        self.trained_on: set[str] = set()
        self.video_init = "new model"
        if (path / "config.json").is_file():
            from ernie_vl.model import ErnieVL

            model = ErnieVL.from_pretrained(path)
            self.trained_on = trained_on(path)
            if classes is not None and model.class_names is None:
                replace_head(model, classes)  # e.g. a model trained on pairs only
            elif classes is not None and list(model.class_names) != classes:
                raise ValueError(f"the model {cfg.model!r} classifies {model.class_names[:10]} but the videos have "
                                 f"classes {classes[:10]}; train from a preset to get a new head")
            from ernie_vl.inflate import inflate_video_from_image

            self.video_init = video_start(cfg.video_init, bool(cfg.videos), self.trained_on,
                                          has_video_stem(model.cfg))
            if self.video_init == INFLATED:
                # --video-init image where it cannot: its ValueError
                model = inflate_video_from_image(model, diff_init=cfg.video_diff_init)
            return model
        import ernie_vl

        overrides = dict(cfg.model_overrides)
        if classes is not None:
            overrides["class_names"] = classes
        return ernie_vl.create_model(cfg.model, **overrides)

    def _choose_settings(self) -> dict[str, Any]:
        """Recipe-controlled settings: the user's where given, else the recipe's (or the plain defaults)."""
        from ernie_vl.train.recipe import PLAIN, choose_recipe

        cfg = self.cfg
        video_run = bool(cfg.videos)
        recipe = choose_recipe(self.clips_per_class, pretrained=bool(self.trained_on), expected_steps=cfg.max_steps,
                               mode=cfg.recipe if video_run else "off")
        self.recipe = recipe
        chosen = recipe.to_dict()
        if cfg.pairs:  # image-text training too: the recipe speaks for the videos only
            chosen["weight_decay"] = PLAIN["weight_decay"]
        settings = {}
        for key in PLAIN:
            given = getattr(cfg, key)
            settings[key] = given if given is not None else chosen[key]
        self.max_steps = cfg.max_steps
        if settings["epochs"] and video_run and cfg.batch_videos:
            cap = max(1, math.ceil(settings["epochs"] * self.num_clips / cfg.batch_videos))
            self.max_steps = min(cfg.max_steps or cap, cap)
        return settings

    def _apply_settings(self) -> None:
        """Label smoothing, same-caption positives, drop-path, freezing and (for a linear probe) the prompt-initialised head."""
        s, model = self.settings, self.model
        if s["label_smoothing"] is not None:
            model.cfg.loss.label_smoothing = float(s["label_smoothing"])
        if self.cfg.caption_positives is not None:
            model.cfg.loss.caption_positives = bool(self.cfg.caption_positives)
        if s["drop_path"]:
            add_drop_path(model.video_encoder, float(s["drop_path"]))
        self.trainable = freeze(model, s["freeze"])
        self.head_init: Optional[str] = None  # how a linear probe's classifier starts (setup.json)
        if s["freeze"] == "backbone" and self.videos is None:
            self.head_init = HEAD_STREAMED
        elif s["freeze"] == "backbone":
            stored = self.videos.clips[:64]
            step = max(1, stored.shape[1] // self.num_frames)  # clips cached with extra frames for jitter
            from_prompts = init_head_from_prompts(model, self.videos.prompt_tokens,
                                                  self.videos.norm.to_float(stored[:, ::step][:, :self.num_frames]))
            self.head_init = HEAD_FROM_PROMPTS if from_prompts else HEAD_RANDOM

    def _build_data(self) -> None:
        from ernie_vl.data.sources import CachedPairs, CachedVideos, cpu_workers

        cfg, model = self.cfg, self.model
        workers = cpu_workers(cfg.num_workers)
        show = cfg.progress and self.ctx.is_main
        self.num_frames = cfg.num_frames or model.cfg.video_encoder.num_frames
        video_size = self._video_size()
        vkw = dict(num_frames=self.num_frames, image_size=video_size, mean=model.preprocess.mean,
                   std=model.preprocess.std, tokenizer=model.tokenizer, prompt_template=cfg.video_prompt_template,
                   num_workers=workers, progress=show, cache_dir=cfg.decode_cache)
        self.mix = StepMix.from_global(cfg.batch_pairs if cfg.pairs else 0, cfg.batch_videos if cfg.videos else 0,
                                       cfg.grad_accum, self.ctx.world_size)
        kw = dict(alpha=cfg.priority_alpha, eps=cfg.priority_eps, uniform_mix=cfg.priority_uniform_mix,
                  ema=cfg.priority_ema, relative=cfg.priority_relative)
        pair_kw, video_kw = dict(kw, kind=cfg.sampler), dict(kw, kind=cfg.video_sampler or cfg.sampler)
        self.augmenter = self._build_augmenter() if cfg.videos else None  # bad label maps fail before decoding
        self.image_augmenter = self._build_image_augmenter()
        if self.augmenter is not None and self.augmenter.cfg.needs_extra_frames:
            vkw_train = dict(vkw, num_frames=2 * self.num_frames)  # room for temporal / frame-rate jitter
        else:
            vkw_train = vkw
        from ernie_vl.data.shards import is_shard_spec

        shards = [is_shard_spec(p) for p in cfg.pairs]
        if any(shards) and not all(shards):
            raise ValueError(f"--pairs takes CSVs or WebDataset shards, not both: {cfg.pairs}")
        listed = None
        if cfg.pairs and not any(shards):
            from ernie_vl.data.pairs import PairList

            listed = PairList.from_csvs(cfg.pairs, cfg.image_col, cfg.caption_col)
        self.streaming = any(shards) or self._cache_mb(video_size, len(listed) if listed else 0) > cfg.cache_max_mb
        self.pairs = self.videos = None
        if any(shards):
            from ernie_vl.data.shard_stream import ShardSource

            clips = None
            if cfg.videos:
                self.videos = CachedVideos(cfg.videos, **vkw_train)
                clips = MixedSource(StepMix(0, self.mix.videos, self.mix.world_size), self.ctx.rank, None,
                                    self.videos, None, PrioritySampler(len(self.videos), seed=cfg.seed + 2, **video_kw),
                                    video_text=cfg.video_text, seed=cfg.seed, augmenter=self.augmenter)
            self.source = ShardSource(self.mix, self.ctx.rank, cfg.pairs, model, workers, cfg.seed, videos=clips)
        elif self.streaming:
            from ernie_vl.data.streaming import StreamingSource

            self.source = StreamingSource(
                self.mix, self.ctx.rank, listed, cfg.videos, model, self.num_frames, video_size,
                lambda n: PrioritySampler(n, seed=cfg.seed + 1, **pair_kw),
                lambda n: PrioritySampler(n, seed=cfg.seed + 2, **video_kw),
                video_text=cfg.video_text, prompt_template=cfg.video_prompt_template, image_col=cfg.image_col,
                caption_col=cfg.caption_col, num_workers=workers, seed=cfg.seed, augmenter=self.augmenter)
        else:
            self.pairs = CachedPairs(listed, model.preprocess, model.tokenizer, cfg.image_col, cfg.caption_col,
                                     workers, show, cfg.decode_cache) if listed else None
            self.videos = CachedVideos(cfg.videos, **vkw_train) if cfg.videos else None
            self.source = MixedSource(
                self.mix, self.ctx.rank, self.pairs, self.videos,
                PrioritySampler(len(self.pairs), seed=cfg.seed + 1, **pair_kw) if self.pairs else None,
                PrioritySampler(len(self.videos), seed=cfg.seed + 2, **video_kw) if self.videos else None,
                video_text=cfg.video_text, seed=cfg.seed, augmenter=self.augmenter)
        if cfg.hard_negative_share > 0 and self.source.pair_sampler is not None:
            from ernie_vl.train.hard_negatives import HardNegativeSampler

            tokens = self.pairs.tokens if self.pairs is not None else self.source.tokens
            self.source.pair_sampler = HardNegativeSampler(
                self.source.pair_sampler, tokens, share=cfg.hard_negative_share, group=cfg.hard_negative_group,
                pool=cfg.hard_negative_pool, seed=cfg.seed)
        self.val_pairs = CachedPairs([cfg.val_pairs], model.preprocess, model.tokenizer, cfg.image_col,
                                     cfg.caption_col, workers, show, cfg.decode_cache) if cfg.val_pairs else None
        self.val_videos = CachedVideos([cfg.val_videos], classes=self.classes, **vkw) if cfg.val_videos else None

    def _build_augmenter(self):
        """The clip augmenter of this run; the label maps are checked against the classes here."""
        from ernie_vl.data.clip_augment import ClipAugmentConfig, ClipAugmenter, declared_maps
        from video.label_maps import LabelMaps

        cfg = self.cfg
        flags = LabelMaps(cfg.hflip_map, cfg.reverse_map, list(cfg.no_hflip), list(cfg.no_reverse))
        declared = any(flags.declared(kind) for kind in ("hflip", "reverse"))
        maps = declared_maps(cfg.videos, flags if declared else None)
        aug = ClipAugmentConfig(maps=maps, p_hflip=cfg.p_hflip, p_reverse=cfg.p_reverse,
                                temporal_jitter=bool(self.settings["temporal_jitter"]),
                                speed_min=float(self.settings["speed_min"]),
                                crop_min_area=float(self.settings["crop_min_area"]), mixup=cfg.mixup, cutmix=cfg.cutmix)
        return ClipAugmenter(aug, self.classes, self.num_frames, seed=cfg.seed)

    def _build_image_augmenter(self):
        """The image augmenter of this run's pairs, or None (no pairs, or both settings off)."""
        from ernie_vl.data.image_augment import ImageAugmentConfig, ImageAugmenter

        aug = ImageAugmentConfig(self.cfg.image_crop_min_area, self.cfg.image_rotate)
        return ImageAugmenter(aug, seed=self.cfg.seed) if self.cfg.pairs and aug.enabled else None

    def setup_summary(self) -> dict[str, Any]:
        """What this run chose beyond its config (recipe, augmentation, video start), for the first log
        record and setup.json."""
        info: dict[str, Any] = {}
        if self.cfg.videos:
            info["videos"] = {"clips_per_class": self.clips_per_class, "clips": self.num_clips,
                              "classes": len(self.classes or [])}
            info["recipe"] = {"mode": self.cfg.recipe, "settings": self.settings, "max_steps": self.max_steps,
                              "why": self.recipe.why,
                              "given": sorted(k for k in self.settings if getattr(self.cfg, k) is not None)}
            info["video_init"] = self.video_init
            if self.video_init == INFLATED:  # where the inflated stem's frame-difference weights started
                info["video_diff_init"] = self.cfg.video_diff_init
            info["trainable_params"] = self.trainable
            if self.head_init is not None:
                info["head_init"] = self.head_init
        if self.augmenter is not None:
            info["augment"] = self.augmenter.summary()
        if self.image_augmenter is not None:
            info["image_augment"] = self.image_augmenter.summary()
        if self.cfg.pairs:
            info["caption_positives"] = bool(self.model.cfg.loss.caption_positives)
        return info

    def skipped_files(self) -> list[tuple[str, str]]:
        """(file, reason) of training items left out since the last call: unreadable images, empty captions,
        undecodable clips (all at once for decoded sources, as they come for streaming ones)."""
        if hasattr(self.source, "take_skipped"):
            return self.source.take_skipped()
        if getattr(self, "_skipped_reported", False):
            return []
        self._skipped_reported = True
        return [f for src in (self.pairs, self.videos) if src is not None for f in src.failures.files]

    def _cache_mb(self, video_size: int, num_pairs: int) -> float:
        """Decoded uint8 size of the training data in MiB (decides in-memory cache vs streaming)."""
        from ernie_vl.data.sources import estimate_bytes, video_dataset

        total = estimate_bytes(num_pairs, 1, self.model.preprocess.image_size)
        for root in self.cfg.videos:
            count = len(video_dataset(root, 2, 32, (0.5,) * 3, (0.5,) * 3, train=False).samples)
            total += estimate_bytes(count, self.num_frames, video_size)
        return total / 2**20

    def _video_size(self) -> int:
        size = self.model.cfg.video_encoder.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _build_curriculum(self):
        if not self.cfg.curriculum:
            return None
        from ernie_vl.moe.curriculum import ExpertCurriculum

        span = self.cfg.curriculum_steps or max(1, (self.cfg.max_steps or 1000) // 3)
        return ExpertCurriculum(hold_steps=span // 3, anneal_steps=span - span // 3)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def _lr_factor(self, step: int) -> float:
        return self.schedule.factor(step)

    def _autocast(self):
        mode = self.cfg.autocast
        if mode == "none" or (mode == "auto" and self.ctx.device.type != "cuda"):
            return nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------ one step
    def _update_priorities(self, drawn, out) -> None:
        per_sample = getattr(out, "per_sample_loss", None) or {}
        for ids, key, sampler in ((drawn.pair_ids, "pairs", self.source.pair_sampler),
                                  (drawn.video_ids, "videos", self.source.video_sampler)):
            if ids is None or sampler is None or per_sample.get(key) is None:
                continue
            losses = all_gather_cat(per_sample[key].detach().float().reshape(-1), self.ctx)
            sampler.update(ids, losses.cpu())

    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.ddp_model
        t0 = time.perf_counter()
        if self.curriculum is not None:
            self.curriculum.apply(unwrap(self.model), self.step)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        samples = 0
        for micro in range(cfg.grad_accum):
            drawn = self.source.next()
            if self.image_augmenter is not None and drawn.batch.images is not None:
                drawn.batch.images = self.image_augmenter(drawn.batch.images, self.mix.pairs, self.ctx.rank)
            batch = to_device(drawn.batch, self.ctx.device)
            sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
            with (nullcontext() if sync else model.no_sync()), self._autocast():
                out = model(batch)
                (out.loss / cfg.grad_accum).backward()
            self._update_priorities(drawn, out)
            samples += drawn.num_samples
            for name, value in {"loss": out.loss, **out.losses}.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
        if self.ctx.distributed:  # log the global-batch means, not rank 0's share
            values = torch.tensor(list(totals.values()), dtype=torch.float64)
            torch.distributed.all_reduce(values)
            totals = dict(zip(totals, (values / self.ctx.world_size).tolist()))
        if self.ep is not None:
            sync_expert_grads(self.model, self.ep)
        grad_norm = clip_grad_norm(self.model, cfg.grad_clip, self.ep) if cfg.grad_clip else None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        update_score_biases(self.model)  # aux-loss-free balancing: routers with a score bias
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        dt = time.perf_counter() - t0
        record: dict[str, Any] = {"step": self.step, "lr": lr, **totals, "samples": samples, "step_time": dt,
                                  "samples_per_s": samples / dt}
        if grad_norm is not None:  # a replicated DTensor under FSDP2
            record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        record["routing"] = routing_summary(out.routing, getattr(out, "active_head_ratio", None))
        if self.meter is not None:
            record["gradient_compression"] = self.meter.take_step_counts()
        return record

    # ------------------------------------------------------------------ loop
    def _fit_schedule(self, step_times: list[float]) -> None:
        """With a time budget: set the schedule length from the measured step time (rank 0 decides)."""
        remaining = self.cfg.minutes * 60 - (time.perf_counter() - self.start_time)
        per_step = float(np.median(step_times))
        fitted = self.step + max(1, int(remaining / per_step))
        fitted = broadcast_object(min(fitted, self.max_steps or fitted), self.ctx)
        self.schedule.refit(self.step, fitted)  # keeps the LR reached so far: no jump
        self.steps_fitted = True

    def _out_of_time(self) -> bool:
        if self.cfg.minutes is None:
            return False
        late = time.perf_counter() - self.start_time > self.cfg.minutes * 60
        return bool(broadcast_object(late, self.ctx))

    def _log(self, record: dict[str, Any]) -> None:
        if self.step == 1:
            record["setup"] = self.setup_summary()
        skipped = self.skipped_files()
        if skipped:
            self.skipped_total += len(skipped)
            record["skipped"] = {"count": len(skipped), "total": self.skipped_total,
                                 "files": [{"path": p, "reason": why} for p, why in skipped]}
        self.history.append({k: v for k, v in record.items() if k not in ("routing", "skipped")})
        if self.log_file is not None and (self.step % max(self.cfg.log_every, 1) == 0 or "eval" in record
                                          or "skipped" in record):
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def run_evaluation(self) -> dict[str, float]:
        """Held-out metrics (of the EMA weights when there is an EMA)."""
        if self.val_pairs is None and self.val_videos is None:
            return {}
        with self._weights_in_use() as model:
            if model is None:  # FSDP2: rank 0 evaluates the gathered weights
                return {}
            return evaluate(model, self.val_pairs, self.val_videos, max_pairs=self.cfg.eval_max_pairs)

    @contextmanager
    def _weights_in_use(self) -> Iterator[Optional[nn.Module]]:
        """The model to save or evaluate: its EMA weights when there is an EMA; under expert parallelism
        an unsharded copy; under FSDP2 the gathered weights in rank 0's copy (None on the other ranks).
        Collective under EP and FSDP2: every rank enters."""
        model = unwrap(self.model)
        with self.ema.swapped(model) if self.ema is not None else nullcontext():
            if self.fsdp:
                state = full_model_state(model)
                if self.fsdp_copy is not None:
                    self.fsdp_copy.load_state_dict(state)
                yield self.fsdp_copy
            else:
                yield plain_model(model, self.ep)

    def save_final(self, final_dir: Path) -> None:
        """``final_dir``: the model (its EMA weights when there is an EMA), marked with what it was trained on."""
        kinds = set(self.trained_on) | {k for k, given in (("pairs", self.cfg.pairs), ("videos", self.cfg.videos))
                                         if given}
        with self._weights_in_use() as model:
            if model is not None and self.ctx.is_main:
                model.save_pretrained(final_dir, metadata={"trained_on": ",".join(sorted(kinds))})

    def run(self, stop_after: Optional[int] = None) -> TrainResult:
        """Train until the schedule ends, the time budget is spent, or ``stop_after`` more steps."""
        from tqdm import tqdm

        cfg = self.cfg
        self.ddp_model.train()
        bar = tqdm(total=self.total_steps if self.total_steps < 10**9 else None, initial=self.step,
                   desc="training", disable=not (cfg.progress and self.ctx.is_main), dynamic_ncols=True)
        step_times: list[float] = []
        taken = 0
        next_refit = -1
        train_start = time.perf_counter()
        total_samples = 0
        record: dict[str, Any] = {}
        while self.step < self.total_steps and (stop_after is None or taken < stop_after):
            if self._out_of_time():
                break
            record = self.train_step()
            taken += 1
            total_samples += record["samples"]
            step_times.append(record["step_time"])
            if cfg.minutes is not None and (
                    (not self.steps_fitted and len(step_times) > cfg.calibration_steps) or taken == next_refit):
                # fitted after the first steps, refitted at 2x, 4x, ... those steps from the recent step
                # times, so a machine whose load changes still ends the schedule near the budget; each
                # refit keeps the cosine progress reached so far (RefittableCosine): the LR never jumps
                self._fit_schedule(step_times[1:] if taken <= 2 * cfg.calibration_steps else step_times[-20:])
                next_refit = 2 * max(taken, cfg.calibration_steps + 1)
                bar.total = self.total_steps
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                record["eval"] = self.run_evaluation()
                self.evaluations.append({"step": self.step, **record["eval"]})
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            if self._checkpoint_due():
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - train_start
        self.save_checkpoint()
        finished = self.step >= self.total_steps or self._out_of_time() or stop_after is None
        final_dir = self.out / "final"
        evaluation: dict[str, float] = {}
        if finished:
            if self.ctx.is_main or self.ep is not None or self.fsdp:  # EP / FSDP2: every rank gathers
                self.save_final(final_dir)
                evaluation = self.run_evaluation()
                if evaluation and self.ctx.is_main:
                    (self.out / "eval.json").write_text(json.dumps(evaluation, indent=1))
            barrier(self.ctx)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        last = {k: v for k, v in record.items() if isinstance(v, float) and (k == "loss" or k in self._loss_names(record))}
        return TrainResult(final_dir=final_dir, steps=self.step, seconds=seconds,
                           samples_per_s=total_samples / seconds if seconds > 0 else 0.0, last_losses=last,
                           evaluation=evaluation, routing=record.get("routing", {}), log_path=self.out / "log.jsonl",
                           history=self.history)

    @staticmethod
    def _loss_names(record: dict[str, Any]) -> set[str]:
        skip = {"step", "lr", "samples", "step_time", "samples_per_s", "grad_norm"}
        return {k for k in record if k not in skip}


def train(cfg: TrainConfig, stop_after: Optional[int] = None) -> TrainResult:
    """Train ErnieVL as ``cfg`` says; see :class:`Trainer`. ``stop_after`` stops (with a checkpoint) early."""
    trainer = Trainer(cfg)
    return trainer.run(stop_after=stop_after)
