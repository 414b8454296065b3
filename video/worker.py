"""The decode worker: a small process that probes and decodes on request (``python -m video.worker``).

Why a process: a decoder stuck in C code (decord issue 373: ``get_batch`` spins
holding the GIL) cannot be interrupted by a thread or a signal handler in the
same interpreter. The client (``video.decode.DecodeService``) waits on the pipe
with a deadline and kills this process when it passes; a crash (segfault in a
decoder) ends only this process. Recycling it every N requests also bounds the
memory decord leaks across many files. It imports numpy, av and decord, never torch.

Protocol on the inherited pipes: each message is an 8-byte little-endian length
and a pickle. Requests: ``{"op": "probe", "path"}``, ``{"op": "frames", "path",
"indices", "backend"}``, ``{"op": "ping"}``, ``{"op": "clear_cache"}``. Replies: ``{"ok": True, ...}`` or
``{"ok": False, "error": exception}``.
"""
from __future__ import annotations

import os
import pickle
import re
import struct
import sys
import time
from collections import OrderedDict

HEADER = struct.Struct("<Q")
PARENT_ENV = "ERNIE_VIDEO_WORKER_PARENT"
FAULT_ENV = "ERNIE_VIDEO_FAULT"  # fault injection for tests: "hang:<substring>" or "crash:<substring>"


def read_message(stream) -> object | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    return pickle.loads(stream.read(size))


def write_message(stream, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _inject_fault(path: str) -> None:
    """Test hook: simulate a decoder that hangs in C holding the GIL, or that crashes."""
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, match = spec.partition(":")
    if not match or match not in path:
        return
    if kind == "hang":
        # catastrophic backtracking runs inside the C regex engine and never releases the GIL
        re.match(r"(a+)+$", "a" * 64 + "b")
    elif kind == "crash":
        os.abort()


class Worker:
    """Holds a small cache of probes and serves requests until stdin closes."""

    def __init__(self, cache_size: int = 64) -> None:
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size

    def info(self, path: str):
        from video.probe import probe_video

        try:
            stat = os.stat(path)
            key = (path, stat.st_size, stat.st_mtime_ns)
        except OSError:
            key = None
        if key is not None and key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        info = probe_video(path)
        if key is not None:
            self.cache[key] = info
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return info

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "clear_cache":  # benchmarks measure first opens
            self.cache.clear()
            return {"ok": True}
        if op == "ping":
            from video.backends import available_backends

            return {"ok": True, "pid": os.getpid(), "backends": available_backends()}
        path = request["path"]
        _inject_fault(path)
        info = self.info(path)
        if op == "probe":
            return {"ok": True, "info": info}
        if op == "frames":
            from video.backends import decode_frames

            frames, used, concealed = decode_frames(info, request["indices"], request.get("backend", "auto"),
                                                    max_concealed=request.get("max_concealed", 0.25))
            return {"ok": True, "frames": frames, "backend": used, "concealed": concealed}
        raise ValueError(f"unknown worker op {op!r}; valid: ping, probe, frames")


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the client process dies, so a stuck decode never outlives it."""
    parent = int(os.environ.get(PARENT_ENV, "0") or 0)
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if parent and os.getppid() != parent:  # the client died before prctl took effect
        os._exit(0)


def main() -> int:
    _die_with_parent()
    # keep the protocol pipe private: anything a C library prints goes to stderr, not into replies
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer
    try:
        import av.logging

        av.logging.set_level(None)  # ffmpeg's per-macroblock complaints on damaged files are noise here
    except ImportError:  # pragma: no cover
        pass
    try:
        import decord.logging

        decord.logging.set_level(decord.logging.QUIET)
    except ImportError:  # pragma: no cover - decord is optional
        pass
    worker = Worker()
    while True:
        request = read_message(proto_in)
        if request is None:
            return 0
        started = time.process_time()
        try:
            reply = worker.handle(request)
        except Exception as err:  # reported to the client, which raises it
            try:
                pickle.dumps(err)
            except Exception:
                err = RuntimeError(f"{type(err).__name__}: {err}")
            reply = {"ok": False, "error": err}
        reply["cpu_s"] = time.process_time() - started  # CPU seconds this request took in the worker
        write_message(proto_out, reply)


if __name__ == "__main__":
    sys.exit(main())
