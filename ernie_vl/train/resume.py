"""Exact resume of a training run: what a run saves, when it saves, and how a resumed run loads it back.

The state is the model, optimiser, LR schedule and scheduler, the data source (samplers, priorities),
the image augmenter, every rank's RNG states, the EMA, PowerSGD's memory, the run's config and its
defining settings (:mod:`ernie_vl.train.run_settings`, checked before a resumed run is built)
(:meth:`ResumableRun._state`); the file format is :mod:`ernie_vl.train.checkpointing` (safetensors +
JSON, never a pickle). :class:`ResumableRun` is a mixin of :class:`ernie_vl.train.trainer.Trainer`
and reads the run's attributes (``cfg``, ``ctx``, ``out``, ``model``, ``optimizer``, ``scheduler``,
``schedule``, ``source``, ``image_augmenter``, ``ema``, ``meter``, ``ep``, ``fsdp``, ``step``,
``run_fingerprint``, ``extend_schedule``).
"""
from __future__ import annotations

import time
import warnings
from typing import Any

from ernie_vl.train import checkpointing as ckpt
from ernie_vl.train.distributed import barrier, broadcast_object, gather_objects, unwrap
from ernie_vl.train.expert_sharding import (ema_state, load_ema_state, load_model_state, load_optimizer_state,
                                            model_state, optimizer_state)
from ernie_vl.train.fsdp import full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state
from ernie_vl.train.run_settings import FINGERPRINT_KEY, check_training_resume


class ResumableRun:
    """Saving and loading the exact state of a :class:`~ernie_vl.train.trainer.Trainer` run."""

    def _state(self) -> dict[str, Any]:
        """The run's state tree (collective: gathers every rank's RNG states); a subclass may add entries."""
        return {"step": self.step, "schedule": self.schedule.state_dict(), "steps_fitted": self.steps_fitted,
                "model": full_model_state(self.model) if self.fsdp else model_state(unwrap(self.model), self.ep),
                "optimizer": (full_optimizer_state(self.model, self.optimizer) if self.fsdp
                              else optimizer_state(self.optimizer, unwrap(self.model), self.ep)),
                "scheduler": self.scheduler.state_dict(), "source": self.source.state_dict(),
                "image_augment": None if self.image_augmenter is None else self.image_augmenter.state_dict(),
                "rng": gather_objects(ckpt.rng_state(), self.ctx), "world_size": self.ctx.world_size,
                "meter": None if self.meter is None else self.meter.state.__getstate__(),
                "ema": ema_state(self.ema, unwrap(self.model), self.ep),
                "config": self.cfg.to_dict(), FINGERPRINT_KEY: self.run_fingerprint}

    def save_checkpoint(self) -> None:
        state = self._state()  # collective (gathers RNG states): every rank calls it
        if self.ctx.is_main:
            ckpt.save_training_state(self.out, state)
        barrier(self.ctx)
        self.last_checkpoint = time.perf_counter()

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` steps and/or ``checkpoint_minutes`` since the last save (rank 0 decides)."""
        cfg = self.cfg
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            return True
        if not cfg.checkpoint_minutes:
            return False
        late = time.perf_counter() - self.last_checkpoint >= cfg.checkpoint_minutes * 60
        return bool(broadcast_object(late, self.ctx))

    def _check_resumable(self) -> bool:
        """Before anything is built: is there a state to resume? Warns when there is none and none was
        expected; refuses a pickle-only folder and one that holds a run (a log or final/) but no state."""
        if ckpt.has_training_state(self.out):  # a pickle-only folder raises LegacyStateError here
            return True
        steps = ckpt.logged_steps(self.out / ckpt.LOG_NAME)
        if steps or (self.out / "final").exists():
            raise ValueError(
                f"--resume: {str(self.out)!r} holds a run ({steps} logged steps"
                f"{', a final/ model' if (self.out / 'final').exists() else ''}) but no "
                f"{ckpt.CHECKPOINT_NAME} to resume it from; refusing to start over from step 0 in it. "
                f"Use a new --out, or drop --resume to overwrite the run")
        warnings.warn(f"--resume: no {ckpt.CHECKPOINT_NAME} in {str(self.out)!r}; starting from step 0",
                      stacklevel=4)
        return False

    def _check_settings(self) -> bool:
        """Before anything is built: refuse a saved run whose defining settings differ (``run_settings``);
        True when a larger ``max_steps`` extends its flat schedule."""
        return check_training_resume(self.out, self.run_fingerprint)

    def _resume(self) -> bool:
        """Load the run folder's state (checked by ``_check_resumable``); False when there is none."""
        if not self.resumable:
            return False
        state = ckpt.load_training_state(self.out)
        if self.fsdp:
            load_full_model_state(self.model, state["model"])
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            load_model_state(unwrap(self.model), state["model"], self.ep)
            load_optimizer_state(self.optimizer, unwrap(self.model), state["optimizer"], self.ep)
        self.scheduler.load_state_dict(state["scheduler"])
        self.source.load_state_dict(state["source"])
        if self.image_augmenter is not None and state.get("image_augment"):
            self.image_augmenter.load_state_dict(state["image_augment"])
        self.step, self.steps_fitted = state["step"], state["steps_fitted"]
        self.schedule.load_state_dict(state["schedule"])
        if self.extend_schedule:  # a larger max_steps on a flat LR (run_settings.max_steps_extension)
            self.schedule.total_steps = max(self.max_steps, self.step)
        if self.ema is not None and state.get("ema"):
            load_ema_state(self.ema, unwrap(self.model), state["ema"], self.ep)
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])
        if self.meter is not None and state.get("meter"):
            for key in ("iter", "error_dict", "p_memory_dict", "q_memory_dict", "rng"):
                if key in state["meter"]:
                    setattr(self.meter.state, key, state["meter"][key])
        return True
