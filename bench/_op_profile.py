"""Where a training step's CPU time goes, per aten operator: a profile that a loaded machine does not distort.

``op_cpu_times(run, calls)`` runs ``run()`` ``calls`` times under a dispatch mode that reads the calling
thread's CPU clock (``time.thread_time_ns``) around every aten operator, forward and backward (the autograd
engine runs CPU backward in the calling thread). Time the thread spends descheduled while other processes run
does not count, so the split holds on a shared machine. With one intra-op thread (``torch.set_num_threads(1)``)
every kernel runs in that thread and the per-op times add up to the step; with more threads the worker
threads' share is missing, so the profile refuses them. The dispatch mode itself costs a few microseconds per
operator (small next to these kernels; the step time is measured separately, without it).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: op families of a conv tokenizer, by aten name prefix; anything else is "other"
FAMILIES = {"convolution": "convolution", "native_batch_norm": "batch norm", "gelu": "GELU",
            "copy_": "copies and layout", "clone": "copies and layout", "cat": "copies and layout",
            "sub": "frame differences", "zero_": "frame differences", "zeros_like": "frame differences"}


def family(op: str) -> str:
    """The family of an aten op name (``convolution_backward`` -> ``convolution``)."""
    return next((name for prefix, name in FAMILIES.items() if op.startswith(prefix)), "other")


def _layout(t: torch.Tensor) -> str:
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return " (channels-last)"
    return "" if t.is_contiguous() else " (strided)"


class _OpTimer(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ns: dict[tuple[str, str], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        elapsed = time.thread_time_ns() - t0
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        shape = "" if first is None else "x".join(map(str, first.shape)) + _layout(first)
        self.ns[func.overloadpacket.__name__, shape] += elapsed
        return out


def op_cpu_times(run, calls: int) -> dict[tuple[str, str], float]:
    """Milliseconds of thread CPU time per call of ``run()``, by (aten op, shape and layout of its first tensor
    argument), over ``calls`` calls. Needs ``torch.get_num_threads() == 1`` (ValueError otherwise)."""
    if torch.get_num_threads() != 1:
        raise ValueError(f"op_cpu_times needs one intra-op thread (torch.set_num_threads(1)), got "
                         f"{torch.get_num_threads()}: other threads' kernel time would be missing")
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    timer = _OpTimer()
    with timer:
        for _ in range(calls):
            run()
    return {key: ns / calls / 1e6 for key, ns in timer.ns.items()}


def is_clip_tensor(shape: str, batch: int) -> bool:
    """Whether a profile key's shape is a 5-D batch of clips or feature maps, (``batch``, C, T, H, W) (the stem
    and the 3-D patch embedding work on these; weights and attention reshapes do not lead with the batch)."""
    dims = shape.split(" ")[0].split("x")
    return len(dims) == 5 and dims[0] == str(batch)


def clip_tensor_ms(times: dict[tuple[str, str], float], batch: int) -> float:
    """Milliseconds per call of the ops whose first tensor is (``batch``, C, T, H, W)."""
    return sum(ms for (_, shape), ms in times.items() if is_clip_tensor(shape, batch))


def five_d_rows(times: dict[tuple[str, str], float], batch: int, min_ms: float = 0.05) -> list[str]:
    """Markdown rows of the ops on (``batch``, C, T, H, W) tensors (the clips, the stem's feature maps, the
    3-D patch embedding), slowest first, then one summary row per family."""
    five_d = {k: v for k, v in times.items() if is_clip_tensor(k[1], batch)}
    rows = ["| op | first input (B, C, T, H, W) | ms / step |", "|---|---|---|"]
    rows += [f"| {op} | {shape} | {ms:.2f} |" for (op, shape), ms in sorted(five_d.items(), key=lambda kv: -kv[1])
             if ms >= min_ms]
    by_family: dict[str, float] = defaultdict(float)
    for (op, _), ms in five_d.items():
        by_family[family(op)] += ms
    rows += [f"| all {name} ops on these tensors | | {ms:.2f} |" for name, ms in sorted(by_family.items(), key=lambda kv: -kv[1])]
    return rows
