"""In-process decoding from packets held in memory: one demux serves the probe and every request.

Used by :class:`video.decode.VideoReader` for files whose probe found nothing a
decoder could wait for (``VideoInfo.unsafe_reason is None``): every index is
checked against the packets that exist, so the decord hang (issue 373, a decoder
waiting for frames the container promised) cannot happen here; other files go
to the process watchdog (``video.worker``).

Work per request (PyAV; the frames equal decord's and the seek-based decoder's, tested):
- packets are sent straight from memory: a "seek" is a decoder flush and a
  jump in the packet list, no container seek, no second demux;
- it decodes forward while the next wanted frame is near and restarts at the
  key frame before it when that skips more than ``restart_cost`` packets (one
  pass on long-GOP files, one short run per wanted frame on short-GOP files);
- non-reference frames nobody asked for are never sent to the decoder;
- it stops at the last wanted frame and converts only wanted frames to RGB, with
  one swscale context per file on one thread (``to_ndarray`` builds a threaded
  context per frame: ~6x the CPU for a 320x240 frame);
- the decoder state survives between requests (multi-view testing reads many
  clips of one file from one open container).

Exactness: used only on the (container, codec) pairs of ``video.plan.FAST_PATHS``, which the corpus
test proves equal to PyAV's sequential decode. As a safety net a decoded frame whose timestamp is
not a packet's, or that comes out of order, raises :class:`PlanMismatch` and the reader switches
the file to the sequential plan. A wanted frame that does not decode is concealed by the nearest
frame that does (``video.conceal``).

Timeout: the deadline is checked before every packet, so a request ends at most
one packet's decode after it (ffmpeg decodes one packet in bounded time; there is
no wait on data that is not there). A crash inside ffmpeg is not contained here.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from video.conceal import DEFAULT_MAX_CONCEALED, assemble, nearest
from video.convert import FrameConverter
from video.errors import VideoDecodeError
from video.probe import VideoInfo, open_container, scan_packets
from video.threads import ThreadChoice, check_threads, choose_threads, fixed_choice

CONCEAL_WINDOW = 32  # frames searched on each side of an undecodable one for its stand-in


class PlanMismatch(VideoDecodeError):
    """Decoded frames do not map one-to-one onto the packets' timestamps: use the sequential plan."""


class PacketDecoder:
    """An open container, its packets in memory and a PyAV decoder; ``decode(indices)`` -> uint8 (T,H,W,3).

    ``info``: a cached probe of this file (same size and mtime) skips the full scan;
    the packets are then read lazily, only as far as requests need.
    ``threads``: decoder threads: an int (1: none; more: frame threading), or "auto"
    (chosen at the first request from its plan, :func:`video.threads.choose_threads`;
    FFmpeg fixes the threading when the codec opens, so later requests keep it);
    ``thread_choice`` says what was used.
    When the scan finds the file unsafe (``info.unsafe_reason``), ``usable`` is False
    and the file is closed at once: ``info`` is still valid.
    """

    def __init__(self, path: str, threads: int | str = 1, deadline: float | None = None,
                 info: VideoInfo | None = None, restart_cost: float = 2.0, allow_unsafe: bool = False,
                 max_concealed: float = DEFAULT_MAX_CONCEALED) -> None:
        self.path = path
        self.max_concealed = float(max_concealed)
        self.last_concealed: list[int] = []
        self.threads = check_threads(threads)
        self.restart_cost = float(restart_cost)
        self._container = open_container(path)
        try:
            self._stream = self._container.streams.video[0] if self._container.streams.video else None
            if info is None:
                info, self._packets = scan_packets(self._container, path, keep_packets=True, deadline=deadline)
                self._demux = None
            else:
                self._packets = []
                self._demux = self._container.demux(self._stream)
            ctx = self._stream.codec_context
        except BaseException:
            self._container.close()
            raise
        self.info = info
        self.usable = allow_unsafe or info.unsafe_reason is None  # False: the caller must use the process watchdog
        if not self.usable:
            self.close()
        self._ctx = ctx
        self.thread_choice: ThreadChoice | None = None
        if self.threads != "auto" and self.usable:
            self._set_threads(fixed_choice(self.threads))
        self._position = [0] * info.num_frames  # frame index -> packet position in decode order
        for k, index in enumerate(info.decode_order):
            self._position[index] = k
        self._droppable = frozenset(info.droppable)
        self._next: int | None = None  # next packet position to send; None: decoder never used
        self._last_out = -1  # frame index of the last frame the decoder returned
        self._floor = 0  # key frame of the last restart: earlier frames (open-GOP leaders) are not trusted
        self._sent: set[int] = set()
        self._drained = False
        self.converter = FrameConverter()
        self._lock = threading.Lock()  # one request at a time: the decoder state is shared
        self.owner_pid = os.getpid()  # a forked child must open its own (the file offset is shared)
        self.packets_sent = 0  # counters for tests and benchmarks
        self.restarts = 0

    def _set_threads(self, choice: ThreadChoice) -> None:
        """Configure the codec's threading (before it opens, i.e. before the first packet)."""
        self._ctx.thread_type = {"frame": "FRAME", "slice": "SLICE"}.get(choice.kind, "NONE")
        self._ctx.thread_count = choice.count
        self.thread_choice = choice

    def packet_source(self) -> tuple | None:
        """(codec context, packets in decode order) when every packet is in memory and nothing was decoded yet
        (the sequential plan's counting pass decodes them without a second demux); else None."""
        if self._demux is not None or self._next is not None or self._container is None:
            return None
        self._next = 0  # handed out once: the codec context is then in use
        return self._ctx, self._packets

    # -- packets ------------------------------------------------------------
    def _packet(self, position: int):
        while self._demux is not None and len(self._packets) <= position:
            packet = next(self._demux, None)
            if packet is None:
                self._demux = None
                break
            if packet.size and not packet.is_corrupt:
                self._packets.append(packet)
        if position >= len(self._packets):
            return None
        return self._packets[position]

    # -- decoding -----------------------------------------------------------
    def _restart(self, key: int) -> None:
        if self._next is not None:
            self._ctx.flush_buffers()
            self.restarts += 1
        self._next = self._position[key]
        self._floor = key
        self._last_out = -1
        self._sent = set()
        self._drained = False

    def _needs_restart(self, target: int, key: int) -> bool:
        if self._next is None or self._last_out >= target:
            return True  # fresh decoder, or its output already went past the target
        if self._position[target] < self._next and target not in self._sent:
            return True  # its packet was passed over (not wanted then)
        if self._drained:
            return True
        return self._position[key] > self._next + self.restart_cost

    def _index(self, frame) -> int:
        """The frame index of a decoded frame, by its timestamp; PlanMismatch when that does not place it."""
        index = self.info.index_of_pts(frame.pts) if frame.pts is not None else None
        if index is None or index <= self._last_out:
            raise PlanMismatch(self.path, f"a decoded frame's timestamp {frame.pts} is not the next packet's "
                                          f"(after frame {self._last_out})")
        self._last_out = index
        return index

    def _take(self, frames, lookup: set[int], got: dict[int, np.ndarray]) -> None:
        for frame in frames:
            index = self._index(frame)
            if index in lookup and index >= self._floor and index not in got:
                got[index] = self.converter.convert(frame)

    def _run_to(self, target: int, lookup: set[int], got: dict[int, np.ndarray], deadline: float | None,
                timeout_s: float | None) -> int:
        """Feed packets until ``target`` is decoded or cannot be; returns the corrupt packets met."""
        import av

        bad = 0
        while target not in got and self._last_out <= target:
            packet = None if self._drained else self._packet(self._next)
            if packet is None:
                if self._drained:
                    break
                self._drained = True  # end of the packets: drain the decoder's delayed frames
                try:
                    self._take(self._ctx.decode(None), lookup, got)
                except av.FFmpegError:
                    bad += 1
                continue
            index = self.info.decode_order[self._next]
            self._next += 1
            if index in self._droppable and index not in lookup:
                continue  # nothing references this frame and nobody wants it: never decode it
            if deadline is not None and time.monotonic() > deadline:
                raise VideoDecodeError(self.path, f"decoding timed out after {timeout_s:.1f} s")
            self._sent.add(index)
            self.packets_sent += 1
            try:
                frames = self._ctx.decode(packet)
            except av.FFmpegError:
                bad += 1  # corrupt packet: skip it, later frames may still decode
                continue
            self._take(frames, lookup, got)
        return bad

    def decode(self, indices: list[int], timeout_s: float | None = None) -> np.ndarray:
        """Frames ``indices`` (checked, any order, repeats allowed) as uint8 (T,H,W,3)."""
        if self._container is None:
            raise ValueError(f"the decoder of {self.path!r} is closed")
        indices = self.info.check_indices(indices)
        if not indices:
            return np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        with self._lock:
            self.last_concealed = []
            return self._decode(indices, timeout_s)

    def _decode(self, indices: list[int], timeout_s: float | None) -> np.ndarray:
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        if self.thread_choice is None:
            self._set_threads(choose_threads(self.info, indices, self.restart_cost))
        wanted = sorted(set(indices))
        lookup = set(wanted)
        got: dict[int, np.ndarray] = {}
        bad = 0
        for target in wanted:
            if target in got:
                continue
            key = self.info.keyframe_before(target)
            restarted = self._needs_restart(target, key)
            if restarted:
                self._restart(key)
            bad += self._run_to(target, lookup, got, deadline, timeout_s)
            if target not in got and not restarted:  # continuing did not reach it: one clean try from its key frame
                self._restart(key)
                bad += self._run_to(target, lookup, got, deadline, timeout_s)
        replacements: dict[int, int] = {}
        missing = [i for i in wanted if i not in got]
        if missing and len(missing) <= self.max_concealed * len(wanted):
            for target in missing:
                stand_in, bad_more = self._nearest_decodable(target, got, deadline, timeout_s)
                bad += bad_more
                if stand_in is not None:
                    replacements[target] = stand_in
        frames, self.last_concealed = assemble(self.path, self.info.num_frames, indices, got, replacements,
                                               self.max_concealed, bad)
        return frames

    def _nearest_decodable(self, target: int, got: dict[int, np.ndarray], deadline: float | None,
                           timeout_s: float | None) -> tuple[int | None, int]:
        """Decode the frames within ``CONCEAL_WINDOW`` of ``target`` (which does not decode) and keep the
        nearest one in ``got``: (its index or None, corrupt packets met)."""
        import av

        first = max(target - CONCEAL_WINDOW, 0)
        last = min(target + CONCEAL_WINDOW, self.info.num_frames - 1)
        self._restart(self.info.keyframe_before(first))
        best: tuple[int, object] | None = None
        bad = 0
        while self._last_out < last and not self._drained:
            if deadline is not None and time.monotonic() > deadline:
                raise VideoDecodeError(self.path, f"decoding timed out after {timeout_s:.1f} s")
            packet = self._packet(self._next)
            self._next += 1
            self._drained = packet is None  # None: the end; this decode drains the delayed frames
            try:
                frames = self._ctx.decode(packet)
            except av.FFmpegError:
                bad += 1
                continue
            for frame in frames:
                index = self.info.index_of_pts(frame.pts) if frame.pts is not None else None
                if index is None:
                    continue  # damaged data: a frame that cannot be placed stands in for nothing
                self._last_out = max(self._last_out, index)
                if index >= first and index != target:
                    if best is None or nearest(target, (best[0], index)) == index:
                        best = (index, frame)
        if best is None:
            return None, bad
        if best[0] not in got:
            got[best[0]] = self.converter.convert(best[1])
        return best[0], bad

    def close(self) -> None:
        container, self._container = self._container, None
        self._packets = []
        self._demux = None
        if container is not None:
            container.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
