"""Caption-neighbour batches: in-batch hard negatives for the image-text contrastive loss.

A random batch of B pairs out of thousands rarely holds two captions that differ in one
word ("a small red circle *at the top*" / "... *at the bottom*"), so the contrastive loss
never has to tell such pairs apart, and retrieval among near-duplicates stays weak. This
sampler wraps the pair sampler and turns a ``share`` of each drawn batch into groups of
``group`` captions that are each other's nearest neighbours: a group's seed is a drawn
sample, the rest of the group are the captions most similar to it among ``pool`` random
candidates (one random pool per step, shared by the groups). Similarity is the cosine of hashed bag-of-n-gram vectors (unigrams and
bigrams of token ids, so word order counts: "A left of B" and "B left of A" are near but
not equal); captions identical to one already in the batch are never picked (they would
be false negatives). Nothing is precomputed over the dataset: each step hashes only its
candidate pool, so the cost does not grow with the dataset.

Like the pair sampler, it draws the *global* batch (identical on every rank) from its own
generator, whose state is part of ``state_dict`` (exact resume).
"""
from __future__ import annotations

from typing import Any

import torch

_HASH_DIM = 1024
# odd 61-bit multipliers of a multiplicative hash of token ids and token-id pairs
_MUL_UNI, _MUL_LEFT, _MUL_RIGHT = 0x1F3D5B79A3C1E5, 0x0B5AD4ECEDA1CE3, 0x165667B19E3779F


def caption_features(tokens: torch.Tensor, dim: int = _HASH_DIM, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, L) int64 token ids (0 = padding) -> (n, dim) float32 L2-normalised hashed uni+bigram counts.

    ``out``: an (n, dim) float32 buffer to fill (reused across steps: a fresh one costs page faults).
    """
    tokens = tokens.to(torch.int64)
    n = tokens.shape[0]
    real = tokens != 0
    uni = (tokens * _MUL_UNI) % dim
    bi = (tokens[:, :-1] * _MUL_LEFT + tokens[:, 1:] * _MUL_RIGHT) % dim
    bi_real = real[:, :-1] & real[:, 1:]
    feats = torch.zeros(n, dim, dtype=torch.float32) if out is None else out.zero_()
    feats.scatter_add_(1, uni, real.float())
    feats.scatter_add_(1, bi, bi_real.float())
    return feats.div_(torch.linalg.vector_norm(feats, dim=1, keepdim=True).clamp_min_(1e-12))


class HardNegativeSampler:
    """Wraps a pair sampler; ``sample_global(B)`` -> (B,) ids whose first ``share * B`` rows are neighbour groups.

    tokens: (N, L) caption token ids of the whole pair source. share: fraction of each batch
    in neighbour groups (0 turns it off). group: captions per group (seed + group-1
    neighbours). pool: random candidates searched per seed.
    """

    def __init__(self, base: Any, tokens: torch.Tensor, share: float = 0.5, group: int = 4, pool: int = 2048,
                 seed: int = 0) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"hard-negative share must be in [0, 1], got {share}")
        if group < 2:
            raise ValueError(f"hard-negative group must be >= 2 (a seed and a neighbour), got {group}")
        if pool < group:
            raise ValueError(f"hard-negative pool ({pool}) must be >= group ({group})")
        if tokens.ndim != 2 or tokens.shape[0] != base.num_samples:
            raise ValueError(f"tokens must be (N, L) with N = {base.num_samples} samples, got {tuple(tokens.shape)}")
        self.base, self.tokens = base, tokens
        self.share, self.group, self.pool = share, group, pool
        self.generator = torch.Generator().manual_seed(seed + 104729)
        self._buffer = torch.empty(0, _HASH_DIM)

    # the pair-sampler interface the sources and the trainer use
    @property
    def num_samples(self) -> int:
        return self.base.num_samples

    @property
    def world_size(self) -> int:
        return self.base.world_size

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        self.base.update(indices, losses)

    def summary(self) -> dict[str, float]:
        return self.base.summary()

    def sample(self, global_batch: int) -> torch.Tensor:
        """This rank's contiguous share of the next global batch."""
        per_rank = global_batch // self.world_size
        rank = self.base.rank
        return self.sample_global(global_batch)[rank * per_rank:(rank + 1) * per_rank]

    def sample_global(self, global_batch: int) -> torch.Tensor:
        drawn = self.base.sample_global(global_batch)
        groups = int(round(self.share * global_batch)) // self.group
        if groups == 0 or self.num_samples <= self.group:
            return drawn
        return self._compose(drawn, groups)

    def _compose(self, drawn: torch.Tensor, groups: int) -> torch.Tensor:
        """Seeds = the first ``groups`` drawn ids; each brings its nearest distinct captions from a random pool."""
        batch = drawn.numel()
        pool = torch.randint(self.num_samples, (min(self.pool, self.num_samples),), generator=self.generator)
        seeds = drawn[:groups]
        rows = groups + len(pool)
        if self._buffer.shape[0] != rows:
            self._buffer = torch.empty(rows, _HASH_DIM)
        feats = caption_features(self.tokens[torch.cat([seeds, pool])], out=self._buffer)
        order = (feats[:groups] @ feats[groups:].t()).argsort(dim=1, descending=True)  # (groups, pool)
        used_ids: set[int] = set()
        used_keys: set[bytes] = set()
        out: list[int] = []

        def take(i: int) -> bool:
            key = self.tokens[i].numpy().tobytes()
            if i in used_ids or key in used_keys:
                return False
            used_ids.add(i)
            used_keys.add(key)
            out.append(i)
            return True

        for g in range(groups):
            if not take(int(seeds[g])):
                continue
            picked = 0
            for j in order[g].tolist():
                if picked == self.group - 1:
                    break
                picked += take(int(pool[j]))
        for i in drawn[groups:].tolist():  # fill the rest with the sampler's own draws
            if len(out) == batch:
                break
            take(i)
        for i in torch.randint(self.num_samples, (4 * batch,), generator=self.generator).tolist():
            if len(out) == batch:  # draws that collided are replaced by random distinct captions
                break
            take(i)
        out.extend(drawn[: batch - len(out)].tolist())  # fewer distinct captions than the batch: allow repeats
        return torch.tensor(out, dtype=torch.int64)

    # resume
    def state_dict(self) -> dict[str, Any]:
        return {**self.base.state_dict(), "hard_negative_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        gen = state.pop("hard_negative_generator", None)
        if gen is None:
            raise ValueError("checkpoint's pair-sampler state has no hard-negative generator: it was saved "
                             "with hard negatives off; resume with the same hard_negative_share")
        self.base.load_state_dict(state)
        self.generator.set_state(gen)
