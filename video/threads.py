"""Decoder threads per request: the ``threads="auto"`` policy of :func:`video.open_video`.

A request's wall-clock time on one decoder thread is its decode work; more
threads shorten it only where the work is a long run of frames that a threaded
decoder can overlap, and only where a core is free for them. Checked in order:

- inside a DataLoader worker (``torch.utils.data.get_worker_info()``): 1 thread
  (the workers already keep the cores busy; decoder threads only add CPU);
- on a machine (CPU affinity) with one core: 1 thread;
- when the request decodes short runs (a restart at a key frame for each wanted
  frame, e.g. short-GOP files, or few frames in all): 1 thread (frame threading
  fills a pipeline of ``count`` frames after every restart and costs more CPU than
  it saves there);
- when fewer than two cores are spare (other threads are running on them:
  ``/proc/loadavg``'s running count, read at the choice): 1 thread (another
  decoder thread would only take CPU from the other jobs; a slice-threaded
  decoder, whose threads meet after every frame, even gets slower);
- otherwise (long runs: long-GOP files, and most of all files without B-frames,
  where nothing can be skipped):
  - slice threading with ``min(spare cores, slices)`` threads when the frames have
    several slices (``VideoInfo.slices``: what x264 writes when it encodes with
    sliced threads, e.g. through PyAV): no pipeline to fill, no output lag, and
    less CPU than frame threading;
  - frame threading with ``min(spare cores + 1, 4)`` threads otherwise (one slice per
    frame: most files; ``cores + 1`` is FFmpeg's own automatic count, the extra
    thread fills the waits of a frame on its reference rows). Its output lags
    ``count - 1`` packets, so a request decodes up to that many frames past its
    last wanted one.

Threaded decoding returns the same pixels as one thread (H.264 decoding is exact).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from video.backends import plan_decodes
from video.probe import VideoInfo

MIN_RUN_PACKETS = 24  # mean packets per run from which threads pay (bench files: short GOP ~9, long GOP 130-230)
MIN_PACKETS = 32  # fewer packets in all: the pipeline start is not worth it
MAX_THREADS = 4
SLICE_THREADING = True  # multi-slice frames: slice threading; False: frame threading for every long run


@dataclass(frozen=True)
class ThreadChoice:
    """Decoder threading for one request: ``count`` threads of ``kind`` ("none", "frame", "slice"), and why."""

    count: int
    kind: str
    reason: str


def in_dataloader_worker() -> bool:
    """True inside a ``torch.utils.data`` worker process (never imports torch itself)."""
    torch = sys.modules.get("torch")
    data = getattr(getattr(torch, "utils", None), "data", None) if torch is not None else None
    return data is not None and data.get_worker_info() is not None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _running_now() -> int | None:
    """The running/runnable thread count of ``/proc/loadavg`` (field 4's numerator); None where unknown."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def others_running(samples: int = 4, interval_s: float = 0.0005) -> int:
    """Threads running or runnable besides the caller (``/proc/loadavg``); 0 where unknown.

    The count is instantaneous, and threads that are finishing (a decoder pool closing, a
    short-lived helper) show up in single reads; the least of ``samples`` reads ``interval_s``
    apart keeps what stays busy (~2 ms in all, once per reader).
    """
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        now = _running_now()
        if now is None:
            return 0
        counts.append(now)
    return max(min(counts) - 1, 0)  # the calling thread is running while it reads


def check_threads(threads: int | str) -> int | str:
    """``threads`` as given when valid ("auto" or an int >= 1); ValueError / TypeError otherwise."""
    if isinstance(threads, str):
        if threads != "auto":
            raise ValueError(f"threads must be \"auto\" or an int >= 1, got {threads!r}")
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be \"auto\" or an int >= 1, got {threads!r} ({type(threads).__name__})")
    if threads < 1:
        raise ValueError(f"threads must be \"auto\" or an int >= 1, got {threads!r}")
    return threads


def fixed_choice(threads: int) -> ThreadChoice:
    """An explicit thread count: 1 = no threading, more = frame threading with that many threads."""
    if threads == 1:
        return ThreadChoice(1, "none", "threads=1 given")
    return ThreadChoice(threads, "frame", f"threads={threads} given")


def choose_threads(info: VideoInfo, indices: list[int], restart_cost: float = 2.0,
                   in_worker: bool | None = None, cores: int | None = None, busy: int | None = None) -> ThreadChoice:
    """The ``threads="auto"`` choice for reading ``indices`` of ``info`` (see the module docstring).

    ``in_worker``, ``cores`` and ``busy`` (other threads running) default to this process's
    situation now (tests pass them).
    """
    in_worker = in_dataloader_worker() if in_worker is None else in_worker
    cores = usable_cores() if cores is None else int(cores)
    if in_worker:
        return ThreadChoice(1, "none", "DataLoader worker: the workers already use the cores")
    if cores < 2:
        return ThreadChoice(1, "none", "one usable core")
    wanted = sorted(set(indices))
    if not wanted:
        return ThreadChoice(1, "none", "nothing to decode")
    packets, seeks = plan_decodes(info, wanted, restart_cost, skip_droppable=True)
    runs = seeks + 1
    if packets < MIN_PACKETS or packets < MIN_RUN_PACKETS * runs:
        return ThreadChoice(1, "none", f"short runs ({packets} packets in {runs} runs)")
    busy = others_running() if busy is None else int(busy)
    spare = cores - busy
    if spare < 2:
        return ThreadChoice(1, "none", f"{busy} other threads running on {cores} cores: fewer than 2 spare")
    why = f"long runs ({packets} packets in {runs} runs), {spare} of {cores} cores spare"
    if info.slices > 1 and SLICE_THREADING:
        return ThreadChoice(min(spare, info.slices), "slice", f"{why}, {info.slices} slices per frame")
    return ThreadChoice(min(spare + 1, MAX_THREADS), "frame", f"{why}, 1 slice per frame")
