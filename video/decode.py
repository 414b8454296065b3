"""Opening videos: ``open_video`` returns a :class:`VideoReader` whose decoding never hangs the caller.

Design (probe first; decode in this process where that is safe, else behind a process watchdog):
1. the file is demuxed once (``video.probe``): the frames that really exist,
   their timestamps and key frames; every index is checked against that before
   any decoder sees it (a container that over-reports its frame count is the
   cause of decord's ``get_batch`` hang, issue 373);
2. ``isolation="auto"`` (default): a file whose probe is clean (every packet
   complete and timestamped, the container's frame count equal to the frames
   found, see ``VideoInfo.unsafe_reason``) is decoded in this process by its plan
   (``video.plan``): from the packets the probe read with key-frame restarts
   (``video.packets``) where the corpus test proves that exact, else by one
   sequential pass (``video.sequential``); PyAV, deadline checked before every
   packet, decoder kept open between requests. Other files, backend="decord"
   (the decoder known to hang) and ``isolation="process"`` go to the decode worker:
3. the worker decodes by the same plan, or with decord where the plan trusts it and it is
   cheaper for the request (``video.backends.decode_frames``); the client waits on the worker's pipe with
   a deadline; past it, the worker is killed (a hang in C holds the GIL, so only a
   process boundary can stop it), the file is reported as a
   :class:`VideoDecodeError`, and the next request starts a fresh worker. The
   worker is recycled every ``max_requests`` requests, which bounds the memory
   decoders leak.

Cost of the worker: one per process (per DataLoader worker), started on first use
(~0.3 s); per request, a pickle of the frames through a pipe; torch is imported
only when tensors are asked for. ``isolation="inline"`` decodes every file in
this process (no process watchdog; the probe's index validation still applies).
Probes are cached per (path, size, mtime) in each process.
"""
from __future__ import annotations

import atexit
import os
from collections import OrderedDict
import pickle
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from video.conceal import DEFAULT_MAX_CONCEALED, check_max_concealed
from video.convert import quarter_turns
from video.errors import VideoDecodeError
from video.plan import DecodePlan, choose_plan, open_planned
from video.probe import VideoInfo, complete_probe, probe_video
from video.threads import ThreadChoice, check_threads
from video.worker import HEADER, PARENT_ENV

if TYPE_CHECKING:  # torch is imported where frames become tensors, not when the module loads
    import torch

ISOLATIONS = ("auto", "process", "inline")
INLINE_MAX_BYTES = 1 << 30  # larger files are not held in memory: they use the seek-based decoders
BACKEND_CHOICES = ("auto", "decord", "pyav")


class DecodeService:
    """A decode worker process with a per-request deadline (see the module docstring).

    Thread-safe (one request at a time). ``timeout_s`` bounds each request (a new
    worker's start-up is waited for apart, up to ``startup_timeout_s``),
    ``max_requests`` recycles the worker, ``env`` adds environment variables
    for the worker (tests use it for fault injection).
    """

    def __init__(self, timeout_s: float = 30.0, max_requests: int = 1000, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 120.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests!r}")
        self.timeout_s = float(timeout_s)
        self.max_requests = int(max_requests)
        self.startup_timeout_s = float(startup_timeout_s)
        self.env = dict(env or {})
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._served = 0
        self._lock = threading.Lock()
        self.restarts = 0  # workers started after the first (timeouts, crashes, recycling)
        self.last_cpu_s = 0.0  # CPU seconds the worker spent on the last request
        self.last_concealed: list[int] = []  # frames of the last request replaced by a decodable neighbour
        self._started = 0

    # -- worker lifecycle -------------------------------------------------
    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(self.env)
        env[PARENT_ENV] = str(os.getpid())
        proc = subprocess.Popen(
            [sys.executable, "-m", "video.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self.restarts += int(self._started > 0)
        self._started += 1
        self._served = 0
        return proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or os.getpid() != self._owner:  # a forked copy never touches its parent's worker
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop the worker (a later request starts a new one)."""
        with self._lock:
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- requests ---------------------------------------------------------
    def _read_exact(self, fd: int, size: int, deadline: float) -> bytes | None:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, min(remaining, 1 << 22))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _exchange(self, proc: subprocess.Popen, message: dict, timeout: float) -> bytes | None:
        """Send ``message``, return the reply's bytes, or None past ``timeout``; VideoDecodeError if the worker dies."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        deadline = time.monotonic() + timeout
        try:
            proc.stdin.write(HEADER.pack(len(data)) + data)
            proc.stdin.flush()
            fd = proc.stdout.fileno()
            head = self._read_exact(fd, HEADER.size, deadline)
            return None if head is None else self._read_exact(fd, HEADER.unpack(head)[0], deadline)
        except (BrokenPipeError, EOFError, OSError):
            self._kill()
            code = proc.returncode
            raise VideoDecodeError(message.get("path", "?"),
                                   f"the decode worker died while reading it (exit code {code})") from None

    def request(self, message: dict, path: str, timeout_s: float | None = None) -> dict:
        """Send one request and wait for the reply; VideoDecodeError on timeout or worker crash."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if self._owner != os.getpid():  # used after a fork: a fresh lock and a worker of our own
            self._lock, self._proc, self._owner = threading.Lock(), None, os.getpid()
        with self._lock:
            if self._proc is not None and (self._proc.poll() is not None or self._served >= self.max_requests):
                self._kill()
            if self._proc is None:
                self._proc = self._start()
                # the deadline of a request must not include the worker's start-up (imports), so wait for it apart
                if self._exchange(self._proc, {"op": "ping"}, max(self.startup_timeout_s, timeout)) is None:
                    self._kill()
                    raise VideoDecodeError(path, f"the decode worker did not start within {self.startup_timeout_s:.0f} s")
            proc = self._proc
            body = self._exchange(proc, message, timeout)
            if body is None:
                self._kill()
                raise VideoDecodeError(path, f"decoding timed out after {timeout:.1f} s (decode worker stopped)")
            self._served += 1
        reply = pickle.loads(body)
        self.last_cpu_s = float(reply.get("cpu_s", 0.0))
        if not reply["ok"]:
            raise reply["error"]
        return reply

    def probe(self, path: str, timeout_s: float | None = None) -> VideoInfo:
        return self.request({"op": "probe", "path": path}, path, timeout_s)["info"]

    def frames(self, path: str, indices: list[int], backend: str = "auto", timeout_s: float | None = None,
               max_concealed: float = DEFAULT_MAX_CONCEALED) -> tuple[np.ndarray, str]:
        """(frames, backend used); ``last_concealed`` lists the requested frames that were concealed."""
        reply = self.request({"op": "frames", "path": path, "indices": indices, "backend": backend,
                              "max_concealed": max_concealed}, path, timeout_s)
        self.last_concealed = list(reply.get("concealed", []))
        return reply["frames"], reply["backend"]

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._kill()
        except Exception:
            pass


_SERVICES: dict[int, DecodeService] = {}


def default_service() -> DecodeService:
    """The decode service of this process (one per pid: a forked child gets its own); timeouts are per request."""
    service = _SERVICES.get(os.getpid())
    if service is None:
        service = _SERVICES[os.getpid()] = DecodeService()
    return service


@atexit.register
def _close_services() -> None:
    service = _SERVICES.get(os.getpid())
    if service is not None:
        service.close()


class ProbeCache:
    """Probes of recently opened files, keyed by (path, size, mtime_ns); a changed file is probed again."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = int(capacity)
        self._items: OrderedDict = OrderedDict()
        self.hits = 0

    @staticmethod
    def key(path: str) -> tuple | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)

    def get(self, path: str) -> VideoInfo | None:
        key = self.key(path)
        info = self._items.get(key) if key is not None else None
        if info is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return info

    def put(self, info: VideoInfo) -> None:
        key = self.key(info.path)
        if key is None or key[1:] != (info.size_bytes, info.mtime_ns):
            return  # the file changed while it was probed
        self._items[key] = info
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


PROBE_CACHE = ProbeCache()


class VideoReader:
    """A probed video: ``len(reader)`` decodable frames, ``fps``, ``duration``, ``get_frames(indices)``.

    Indices outside ``[0, len(reader))`` raise ValueError naming the valid range. ``plan`` says how
    the file is decoded and why (``video.plan``: key-frame restarts where the corpus test proves them
    exact, else one sequential pass). ``last_backend`` says which decoder served the last request,
    ``last_concealed`` which requested frames did not decode and were replaced by their nearest
    decodable neighbour (a request fails when more than ``max_concealed`` of its frames are);
    ``isolation_used`` is "inline" or "process" (see the module docstring); ``thread_choice`` is the
    in-process decoder's threading (None before its first request, and for the worker). Close it (or
    use it as a context manager) to release the open file and its packets at once.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", timeout_s: float = 30.0,
                 isolation: str = "auto", service: DecodeService | None = None, threads: int | str = "auto",
                 cache: ProbeCache | None = PROBE_CACHE, max_concealed: float = DEFAULT_MAX_CONCEALED) -> None:
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend {backend!r} is not one of: {', '.join(BACKEND_CHOICES)}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation {isolation!r} is not one of: {', '.join(ISOLATIONS)}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise VideoDecodeError(self.path, "file does not exist")
        self.backend = backend
        self.isolation = isolation
        self.timeout_s = float(timeout_s)
        self.threads = check_threads(threads)
        self.max_concealed = check_max_concealed(max_concealed)
        self.last_backend: str | None = None
        self.last_concealed: list[int] = []
        self.thread_choice: ThreadChoice | None = None
        self._decoder = None  # video.packets.PacketDecoder or video.sequential.SequentialDecoder, in process
        self.service: DecodeService | None = None
        if isolation == "process":
            self._use_worker(service)
            return
        cached = cache.get(self.path) if cache is not None else None
        deadline = time.monotonic() + self.timeout_s
        wants_decord = backend == "decord" or (backend == "auto" and "pyav" not in _available())
        if cached is not None:
            info = cached if cached.complete or not wants_decord else complete_probe(cached)
        elif wants_decord or os.path.getsize(self.path) > INLINE_MAX_BYTES:
            info = probe_video(self.path, deadline=deadline)
        else:
            from video.packets import PacketDecoder

            info = self._open_decoder(PacketDecoder, None, deadline, allow_unsafe=True)
            if info.damage_reason is None and not info.counted and choose_plan(info).kind == "sequential":
                info = self._count(info, deadline)  # the header's count and missing timestamps do not matter here
        if cache is not None and cached is None and (info.counted or info.unsafe_reason is None):
            cache.put(info)
        self.info = info
        inline_ok = info.unsafe_reason is None and not wants_decord and info.size_bytes <= INLINE_MAX_BYTES
        if isolation == "auto" and not inline_ok:
            self.close()
            if info.counted or wants_decord:
                self.service = service if service is not None else default_service()
                self.isolation_used = "process"
            else:
                self._use_worker(service)  # the worker's probe counts what the demux could not
        else:
            self.isolation_used = "inline"
            if not inline_ok:
                self.close()  # "inline" on a file the in-process decoders refuse: decode_frames, in process
                if not info.counted and choose_plan(info).kind == "sequential":
                    self.info = complete_probe(info, max(deadline - time.monotonic(), 0.001))

    def _use_worker(self, service: DecodeService | None) -> None:
        self.service = service if service is not None else default_service()
        self.info: VideoInfo = self.service.probe(self.path, timeout_s=self.timeout_s)
        self.isolation_used = "process"

    def _open_decoder(self, factory, info: VideoInfo | None, deadline: float, allow_unsafe: bool = False) -> VideoInfo:
        decoder = factory(self.path, threads=self.threads, deadline=deadline, info=info,
                          max_concealed=self.max_concealed, allow_unsafe=allow_unsafe)
        if decoder.usable:
            self._decoder = decoder
        return decoder.info

    def _count(self, info: VideoInfo, deadline: float) -> VideoInfo:
        """Sequential plan: the frame count from the bitstream where it tells (MPEG-4 Part 2), else from one
        full decoding pass, whose decoded frames then serve the first requests."""
        from video.sequential import SequentialDecoder, count_from_packets

        scanned = self._decoder if hasattr(self._decoder, "packet_source") else None
        if scanned is not None and scanned.usable and scanned._demux is None:
            counted = count_from_packets(info, scanned._ctx.extradata, scanned._packets)
            if counted is not None:  # the bitstream tells the count: no decoding at open, the packets serve pass 1
                self._decoder = SequentialDecoder(self.path, counted, max_concealed=self.max_concealed,
                                                  preloaded=scanned)
                return counted
        source = scanned.packet_source() if scanned is not None else None
        decoder = SequentialDecoder(self.path, info, max_concealed=self.max_concealed)
        try:
            info = decoder.count(timeout_s=max(deadline - time.monotonic(), 0.001), source=source)
        except BaseException:
            decoder.release()
            raise
        finally:
            self.close()  # the scan's container and packets
        if info.unsafe_reason is None:
            self._decoder = decoder
        else:
            decoder.release()
        return info

    @property
    def plan(self) -> DecodePlan:
        """How this file is decoded, and why (``video.plan.choose_plan``)."""
        return choose_plan(self.info)

    def __len__(self) -> int:
        return self.info.num_frames

    @property
    def fps(self) -> float:
        return self.info.fps

    @property
    def duration(self) -> float:
        return self.info.duration

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames as returned (upright: a rotation by 90 degrees swaps them)."""
        rotation = self.info.rotation
        if self._decoder is not None and self._decoder.converter.rotation:
            rotation = self._decoder.converter.rotation
        h, w = self.info.height, self.info.width
        return (w, h) if quarter_turns(rotation) % 2 else (h, w)

    def timestamps(self, indices: Sequence[int]) -> "torch.Tensor":
        """Seconds from the first frame, float64 (T,)."""
        import torch

        return torch.tensor([self.info.frame_time(i) for i in self.info.check_indices(indices)], dtype=torch.float64)

    def get_frames_numpy(self, indices: Sequence[int]) -> np.ndarray:
        """Frames as numpy uint8 (T,H,W,3), upright RGB, in the order of ``indices``."""
        indices = self.info.check_indices(_as_index_list(indices))
        concealed: list[int] = []
        if self.service is not None:
            frames, used = self.service.frames(self.path, indices, self.backend, timeout_s=self.timeout_s,
                                               max_concealed=self.max_concealed)
            concealed = self.service.last_concealed
        elif self.info.unsafe_reason is None and self.backend != "decord" and self.info.size_bytes <= INLINE_MAX_BYTES:
            frames, concealed, used = self._decode_inline(indices), None, "pyav"
        else:
            from video.backends import decode_frames

            frames, used, concealed = decode_frames(self.info, indices, self.backend, max_concealed=self.max_concealed)
        self.last_backend = used
        self.last_concealed = list(concealed if concealed is not None else self._decoder.last_concealed)
        return frames

    def _decode_inline(self, indices: list[int]) -> np.ndarray:
        from video.packets import PlanMismatch

        if self._decoder is not None and self._decoder.owner_pid != os.getpid():
            self._decoder = None  # opened before a fork: the parent's file offset must not move under it
        if self._decoder is None:  # cached probe, or reopened after close(): packets are read as needed
            self._decoder = open_planned(self.info, threads=self.threads, max_concealed=self.max_concealed)
        try:
            frames = self._decoder.decode(indices, timeout_s=self.timeout_s)
        except PlanMismatch:  # the packets do not map onto the frames: count them and read them in order
            self.close()
            self.info = self._count(self.info, time.monotonic() + self.timeout_s)
            if self._decoder is None:
                raise VideoDecodeError(self.path, f"decoding found damaged data: {self.info.unsafe_reason}") from None
            frames = self._decoder.decode(self.info.check_indices(indices), timeout_s=self.timeout_s)
        self.thread_choice = self._decoder.thread_choice
        return frames

    def get_frames(self, indices: Sequence[int]) -> "torch.Tensor":
        """Frames as a uint8 tensor (T,H,W,3), in the order of ``indices``."""
        import torch

        return torch.from_numpy(self.get_frames_numpy(indices))

    def close(self) -> None:
        """Release the open file and the packets or frames held in memory (a later request reopens it)."""
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            getattr(decoder, "release", decoder.close)()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        i = self.info
        return (f"VideoReader({self.path!r}, frames={i.num_frames}, fps={i.fps:.3f}, size={i.width}x{i.height}, "
                f"backend={self.backend}, isolation={self.isolation_used})")


def _available() -> list[str]:
    from video.backends import available_backends

    return available_backends()


def _as_index_list(indices) -> list[int]:
    torch = sys.modules.get("torch")  # a tensor can only come from an already imported torch
    if torch is not None and isinstance(indices, torch.Tensor):
        if indices.dtype.is_floating_point:
            raise TypeError(f"frame indices must be integers, got a {indices.dtype} tensor")
        return indices.reshape(-1).tolist()
    if isinstance(indices, np.ndarray):
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"frame indices must be integers, got a {indices.dtype} array")
        return indices.reshape(-1).tolist()
    out = list(indices)
    for i in out:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"frame indices must be integers, got {i!r} ({type(i).__name__})")
    return [int(i) for i in out]


def open_video(path: str | os.PathLike, backend: str = "auto", timeout_s: float = 30.0,
               isolation: str = "auto", threads: int | str = "auto",
               max_concealed: float = DEFAULT_MAX_CONCEALED) -> VideoReader:
    """Open ``path`` for frame access; VideoDecodeError naming the file when it has no decodable video.

    ``backend``: "auto" (in process: the planned PyAV decoder; in the worker: the
    cheaper per request, decord falling back to PyAV), "decord" or "pyav".
    ``timeout_s`` bounds every probe and decode request. ``isolation``: "auto"
    (in process when the probe says it is safe, else the worker), "process", "inline".
    ``threads``: decoder threads for in-process decoding. "auto" (default) picks per reader at
    its first request (``video.threads.choose_threads``): 1 thread inside a DataLoader worker
    (the workers already use the cores), for requests that decode short runs (a restart per
    wanted frame: short GOPs), and when fewer than 2 cores are spare; else, for long runs (long
    GOPs, most of all without B-frames, where nothing is skippable), slice threading on frames
    with several slices and frame threading (``min(spare cores + 1, 4)`` threads) on the others.
    An int is used as given (1: no threading, the least CPU; more: frame threading, lower
    latency when cores are idle, more CPU). The frames are the same either way.
    ``max_concealed``: the fraction of a request's frames that may be replaced by their nearest
    decodable neighbour when they do not decode (damaged data) before the request fails.
    """
    return VideoReader(path, backend=backend, timeout_s=timeout_s, isolation=isolation, threads=threads,
                       max_concealed=max_concealed)
