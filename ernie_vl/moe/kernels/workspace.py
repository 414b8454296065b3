"""Thread-local scratch buffers for the fused expert kernels.

A large fresh tensor costs more than its arithmetic suggests on CPU: glibc serves
allocations above its mmap threshold (at most 32 MB) from new pages, and the kernel
zero-fills every 4 KB page on first touch (measured here: filling a fresh 64 MB tensor
took ~55 ms on one core, refilling a reused one ~10 ms). The expert kernels' temporaries
(the gathered rows, one expert's hidden activations, the gradient slices of the backward
pass) never leave a call, so they live in buffers kept per thread and reused by every
call of every MoE layer on that thread. Nothing returned to the caller or saved for the
backward pass is a scratch view.

The store holds, per thread and dtype/device, one buffer per named slot, grown to the
largest size requested; :func:`release_workspace` frees them.
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import torch


class _Store(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


_STORE = _Store()


def scratch(slot: str, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device.

    Valid until the next request of the same ``slot`` on this thread; two live
    temporaries must use two slots.
    """
    numel = math.prod(shape)
    key = (slot, like.dtype, like.device)
    buf = _STORE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        _STORE.buffers.pop(key, None)  # free the old one before allocating the larger one
        # a normal tensor even under inference_mode, so later autograd-enabled calls may write it
        with torch.inference_mode(False), torch.no_grad():
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        _STORE.buffers[key] = buf
    return buf[:numel].view(tuple(shape))


def workspace_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(b.numel() * b.element_size() for b in _STORE.buffers.values())


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are re-created on the next call)."""
    _STORE.buffers.clear()
