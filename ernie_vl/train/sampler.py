"""Loss-priority sampling (BRIEF.md #6: high-loss samples are loaded first).

Each sample i is drawn with probability

    p_i = (1 - u) * w_i / sum(w) + u / N,      w_i = (loss_i + eps) ** alpha

where ``loss_i`` is its most recent per-sample loss (or an exponential moving
average of them, ``ema``), and ``u`` is the uniform share that keeps every
sample reachable. Samples never seen yet count as the current maximum loss, so
they come first. ``kind="uniform"`` is the baseline: shuffled epochs.

``relative=True`` records each loss divided by the mean loss of the batch it was
measured in. A recorded loss is a snapshot of the model at that step, and the
training loss falls fast early on: absolute losses rank a sample seen at step 5
(when every loss was high) above one seen at step 95 that is hard *now*, so the
draws follow how long ago a sample was seen rather than how hard it is. The
ratio to its batch's mean compares samples against the model of their own step.

Sharding across ranks: every rank holds the same sampler state (same seed, and
the trainer feeds every rank the per-sample losses of the *global* batch), draws
the same global batch, and keeps its contiguous slice ``[rank*b:(rank+1)*b]``,
which is exactly how the contrastive loss orders gathered features.
"""
from __future__ import annotations

from typing import Any

import torch

SAMPLER_KINDS = ("priority", "uniform")


class PrioritySampler:
    """Draws global batches of indices into a dataset of ``num_samples`` items.

    ``sample(global_batch)`` -> LongTensor (global_batch // world_size,) of this rank;
    ``update(indices (n,), losses (n,))`` with the global batch's indices and losses.
    """

    def __init__(self, num_samples: int, kind: str = "priority", alpha: float = 1.0, eps: float = 0.01,
                 uniform_mix: float = 0.2, ema: float = 0.0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, relative: bool = False) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if kind not in SAMPLER_KINDS:
            raise ValueError(f"unknown sampler kind {kind!r}; valid: {list(SAMPLER_KINDS)}")
        if alpha < 0 or eps <= 0:
            raise ValueError(f"need alpha >= 0 and eps > 0, got alpha={alpha}, eps={eps}")
        if not 0.0 <= uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size {rank}/{world_size}")
        self.num_samples, self.kind = num_samples, kind
        self.alpha, self.eps, self.uniform_mix, self.ema = alpha, eps, uniform_mix, ema
        self.relative = relative
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.losses = torch.full((num_samples,), float("nan"), dtype=torch.float64)
        self.draws = torch.zeros(num_samples, dtype=torch.int64)
        self._perm = torch.empty(0, dtype=torch.int64)  # uniform kind: rest of the current epoch
        self._pos = 0

    # ------------------------------------------------------------------ drawing
    def probabilities(self) -> torch.Tensor:
        """(N,) float64 sampling probabilities (uniform for the uniform kind)."""
        n = self.num_samples
        if self.kind == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        seen = ~torch.isnan(self.losses)
        fill = float(self.losses[seen].max()) if bool(seen.any()) else 1.0
        loss = torch.where(seen, self.losses, torch.full_like(self.losses, fill)).clamp_min(0.0)
        weight = (loss + self.eps) ** self.alpha
        return (1.0 - self.uniform_mix) * weight / weight.sum() + self.uniform_mix / n

    def sample_global(self, global_batch: int) -> torch.Tensor:
        """(global_batch,) int64 indices of the whole step (identical on all ranks)."""
        if global_batch <= 0:
            raise ValueError(f"global_batch must be > 0, got {global_batch}")
        if self.kind == "uniform":
            out = []
            need = global_batch
            while need > 0:
                if self._pos >= len(self._perm):
                    self._perm, self._pos = torch.randperm(self.num_samples, generator=self.generator), 0
                take = self._perm[self._pos:self._pos + need]
                self._pos += len(take)
                need -= len(take)
                out.append(take)
            idx = torch.cat(out)
        else:
            replacement = global_batch > self.num_samples
            idx = torch.multinomial(self.probabilities(), global_batch, replacement=replacement, generator=self.generator)
        self.draws.index_add_(0, idx, torch.ones_like(idx))
        return idx

    def sample(self, global_batch: int) -> torch.Tensor:
        """This rank's contiguous share of the next global batch."""
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {self.world_size}")
        per_rank = global_batch // self.world_size
        return self.sample_global(global_batch)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (global batch) for the next draws (``relative``: as ratios to the
        batch's mean finite loss)."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        losses = torch.as_tensor(losses).detach().to(torch.float64).reshape(-1)
        if indices.shape != losses.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and losses {tuple(losses.shape)} differ in size")
        finite = torch.isfinite(losses)
        indices, losses = indices[finite], losses[finite]
        if self.relative and losses.numel():
            losses = losses / losses.clamp_min(0.0).mean().clamp_min(1e-12)
        if self.ema > 0:
            old = self.losses[indices]
            losses = torch.where(torch.isnan(old), losses, self.ema * old + (1 - self.ema) * losses)
        self.losses[indices] = losses

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_samples": self.num_samples, "generator": self.generator.get_state(),
                "losses": self.losses.clone(), "draws": self.draws.clone(), "perm": self._perm.clone(),
                "pos": self._pos, "relative": self.relative}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind or state["num_samples"] != self.num_samples:
            raise ValueError(f"sampler state is for kind={state['kind']!r} over {state['num_samples']} samples; "
                             f"this sampler is kind={self.kind!r} over {self.num_samples}")
        if bool(state.get("relative", False)) != self.relative:
            raise ValueError(f"sampler state recorded {'relative' if state.get('relative') else 'absolute'} losses; "
                             f"this sampler records {'relative' if self.relative else 'absolute'} ones "
                             "(priority_relative must match the run being resumed)")
        self.generator.set_state(state["generator"])
        self.losses.copy_(state["losses"])
        self.draws.copy_(state["draws"])
        self._perm, self._pos = state["perm"].clone(), int(state["pos"])

    def summary(self) -> dict[str, float]:
        """Plain numbers for logs: share of samples seen, mean recorded loss, max/min draw-probability ratio."""
        seen = ~torch.isnan(self.losses)
        p = self.probabilities()
        return {"seen_fraction": float(seen.double().mean()),
                "mean_loss": float(self.losses[seen].mean()) if bool(seen.any()) else float("nan"),
                "p_max_over_min": float(p.max() / p.min())}
