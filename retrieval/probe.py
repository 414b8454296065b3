"""Linear probe on frozen embeddings: multinomial logistic regression fitted with L-BFGS in torch.

Features are standardised with the training set's mean and std. The L2 weight decay is
chosen on a held-out validation split of the training set (stratified, seeded) from a
log-spaced grid, 1e-6 to 100 in half decades (a decay at the grid's edge was the best on
the digits before the grid was widened); the probe is then refitted on the whole training
set with that decay (CLIP's linear-probe protocol, with torch's L-BFGS instead of
scikit-learn's). A probe saves to a folder: ``probe.safetensors`` (weight, bias, mean,
std) + ``probe.json`` (classes, decay, and which image features it reads).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

WEIGHT_DECAYS: tuple[float, ...] = tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-12, 5))  # 1e-6 ... 100
# below this many feature values (N x D) one thread solves fastest: L-BFGS makes thousands of small products, whose
# thread start-up costs more than it saves (40x slower with 2 threads than 1 on 1,078 x 128 when the cores are shared)
SINGLE_THREAD_BELOW = 4_000_000


@contextmanager
def _threads_for(numel: int):
    """torch's intra-op threads set to 1 for a problem of ``numel`` feature values under
    ``SINGLE_THREAD_BELOW`` (chosen at run time, restored after)."""
    before = torch.get_num_threads()
    if numel < SINGLE_THREAD_BELOW and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LinearProbe:
    """``logits(x (N,D)) -> (N,C)``; ``classes``; the chosen ``weight_decay`` and its validation top-1."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    classes: list[str]
    weight_decay: float
    val_top1: Optional[float] = None
    model_id: Optional[str] = None
    features: str = "embedding"  # which image features it was fitted on ("embedding" or "pooled")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"features of shape {tuple(x.shape)} do not fit a probe over {self.weight.shape[1]} "
                             f"dimensions")
        return ((x.float() - self.mean) / self.std) @ self.weight.t() + self.bias

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(), "mean": self.mean.contiguous(),
                   "std": self.std.contiguous()}, str(folder / "probe.safetensors"))
        (folder / "probe.json").write_text(json.dumps({
            "classes": self.classes, "weight_decay": self.weight_decay, "val_top1": self.val_top1,
            "model_id": self.model_id, "features": self.features, "format": "ernie-vl-linear-probe-v1"}, indent=1, ensure_ascii=False))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "LinearProbe":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "probe.json").is_file() or not (folder / "probe.safetensors").is_file():
            raise ValueError(f"{str(folder)!r} is not a saved linear probe (probe.json + probe.safetensors)")
        meta = json.loads((folder / "probe.json").read_text(encoding="utf-8"))
        t = load_file(str(folder / "probe.safetensors"))
        missing = sorted({"weight", "bias", "mean", "std"} - set(t))
        if missing:
            raise ValueError(f"probe {str(folder)!r} lacks tensors {missing}")
        return cls(t["weight"], t["bias"], t["mean"], t["std"], list(meta["classes"]), float(meta["weight_decay"]),
                   meta.get("val_top1"), meta.get("model_id"), str(meta.get("features", "embedding")))


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
         init: Optional[tuple] = None) -> tuple:
    """(weight (C,D), bias (C,)) minimising mean cross-entropy + weight_decay * ||W||^2 / 2 (full-batch L-BFGS),
    started from ``init`` (a neighbouring decay's solution) or zeros."""
    if init is None:
        w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    else:
        w = init[0].to(torch.float64).clone().requires_grad_(True)
        b = init[1].to(torch.float64).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def _split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, validation) index split; every class with >= 2 items gives one or more to validation."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx))) if len(idx) >= 2 else 0
        k = max(1, k) if len(idx) >= 2 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(val)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                     weight_decays: Sequence[float] = WEIGHT_DECAYS, val_fraction: float = 0.2, max_iter: int = 500,
                     seed: int = 0, model_id: Optional[str] = None, feature_kind: str = "embedding") -> LinearProbe:
    """Fit a probe on ``features`` (N,D) with ``labels`` (N,) in ``range(len(classes))``; see the module docstring."""
    # copies made here, outside any inference mode, so that features from one are fine for autograd
    x = torch.as_tensor(features).to(torch.float64, copy=True)
    y = torch.as_tensor(labels).to(torch.int64, copy=True)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need features (N,D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(y) < 2 or not len(weight_decays):
        raise ValueError(f"need >= 2 training items and >= 1 weight decay, got {len(y)} and {list(weight_decays)}")
    if int(y.min()) < 0 or int(y.max()) >= len(classes):
        raise ValueError(f"labels must lie in [0, {len(classes)}), got [{int(y.min())}, {int(y.max())}]")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    tr, va = _split(y, val_fraction, seed)
    scores, solutions, previous = {}, {}, None
    with _threads_for(z.numel()):
        for wd in sorted({float(d) for d in weight_decays}, reverse=True):  # strong to weak, each warm-started
            previous = _fit(z[tr], y[tr], len(classes), wd, max_iter, previous)
            w, b = previous
            solutions[wd] = previous
            scores[wd] = float(((z[va].float() @ w.t() + b).argmax(1) == y[va]).double().mean())
        best = max(scores, key=lambda wd: (scores[wd], wd))  # ties: the stronger decay
        w, b = _fit(z, y, len(classes), best, max_iter, solutions[best])
    return LinearProbe(w, b, mean.float(), std.float(), list(classes), best, scores[best], model_id, feature_kind)
