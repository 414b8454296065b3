"""Per-process set-up of a training run: thread count, seeds, moving a batch to the device."""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch


def resolve_threads(requested: Optional[int]) -> int:
    """Threads for this process: ``requested``, or (None) all CPUs of this process unless the
    machine is oversubscribed (1-minute load >= 1.5 x CPUs), where one thread is much faster: with
    several, OpenMP threads spin-wait for a descheduled partner at every parallel region."""
    if requested:
        return int(requested)
    from ernie_vl.data.sources import cpu_workers

    cpus = max(1, cpu_workers(64))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return 1 if load >= 1.5 * cpus else cpus


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (the same model initialisation on every rank)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch dataclass with every tensor field on ``device`` (no copy on CPU)."""
    if device.type == "cpu":
        return batch
    import dataclasses

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})
