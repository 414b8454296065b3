"""The sequential plan: frames numbered in the order the decoder outputs them, one forward pass.

This is the reference itself (PyAV's sequential decode), so it is exact on every file PyAV can
read: AVI with packed B-frames or N-VOP placeholders, msmpeg4, files without timestamps. The frame
count is what a full pass produces: read from the bitstream where it tells (MPEG-4 Part 2: the
coded VOPs, ``video.mpeg4``), else counted by one decoding pass when the file is probed
(:func:`count_frames`), so ``len(reader)`` never trusts a header that promises more. Should a later
pass end early all the same, the frames past its end are concealed by the last one (and reported). A request decodes forward from where the
last one stopped (from the start again when it asks for an earlier frame), converts only the wanted
frames, and stops after the last one. The frames of the counting pass are kept (as decoded YUV,
within ``keep_bytes``) for the reader that ran it, so its first requests decode nothing again.
A frame that a later pass does not produce (damaged data that decodes differently) is concealed by
the nearest one that did (``video.conceal``).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np

from video.conceal import DEFAULT_MAX_CONCEALED, assemble
from video.convert import FrameConverter, quarter_turns
from video.errors import VideoDecodeError
from video.probe import VideoInfo, open_container
from video.threads import ThreadChoice

KEEP_BYTES = 256 << 20  # decoded frames kept from the counting pass, per reader


def _frame_bytes(info: VideoInfo) -> int:
    deep = any(tag in info.pix_fmt for tag in ("10", "12", "16"))
    return int(info.width * info.height * 3 * (2 if deep else 1))  # 4:4:4 bound


class SequentialDecoder:
    """``decode(indices) -> uint8 (T,H,W,3)`` by one forward pass from the start; ``last_concealed`` lists
    the requested indices that were replaced by a neighbour (see the module docstring)."""

    def __init__(self, path: str, info: VideoInfo, max_concealed: float = DEFAULT_MAX_CONCEALED,
                 preloaded=None) -> None:
        self.path = path
        self._preloaded = preloaded  # a PacketDecoder whose packets (all in memory) serve the first pass
        self.info = info
        self.max_concealed = float(max_concealed)
        self.converter = FrameConverter()
        self._container = None
        self._frames = None  # generator of decoded frames from the start
        self._position = 0  # index of the next frame the generator yields
        self._last = None  # (index, frame) of the last frame yielded
        self._kept: dict[int, object] = {}
        self.bad_packets = 0
        self.passes = 0  # forward passes started (tests and benchmarks)
        self._lock = threading.Lock()
        self.owner_pid = os.getpid()
        self.thread_choice = ThreadChoice(1, "none", "sequential plan: one decoder thread (packed MPEG-4 frames "
                                                     "are not safe with frame threads)")
        self.last_concealed: list[int] = []

    # -- the pass ---------------------------------------------------------
    def _open(self, source: tuple | None = None) -> None:
        """Start a pass: from the file, or from ``source`` = (an unopened codec context, the packets in memory)."""
        self.close()
        if source is None and self._preloaded is not None:
            source = self._preloaded.packet_source()  # None once it was used
        if source is None:
            self._release_preloaded()
            self._container = open_container(self.path)
            stream = self._container.streams.video[0]
            ctx, packets = stream.codec_context, self._container.demux(stream)
        else:
            ctx, kept = source
            packets = iter([*kept, None])
        ctx.thread_type, ctx.thread_count = "NONE", 1  # packed MPEG-4 frames are not safe with frame threads
        self._frames = self._generate(packets, ctx)
        self._position = 0
        self._last = None
        self.passes += 1

    def _generate(self, packets, ctx):
        import av

        try:
            for packet in packets:
                if packet is not None and packet.size and packet.is_corrupt:
                    self.bad_packets += 1
                    continue
                try:
                    frames = ctx.decode(packet if packet is not None and packet.size else None)
                except av.FFmpegError:
                    self.bad_packets += 1  # damaged packet: the decoder goes on with the next one
                    continue
                yield from frames
        except av.FFmpegError:
            self.bad_packets += 1  # the demuxer gave up: what was decoded stays valid

    def _next(self, deadline: float | None, timeout_s: float | None):
        if deadline is not None and time.monotonic() > deadline:
            raise VideoDecodeError(self.path, f"decoding timed out after {timeout_s:.1f} s")
        frame = next(self._frames, None)
        if frame is None:
            return None
        self._last = (self._position, frame)
        self._position += 1
        return self._last

    def count(self, keep_bytes: int = KEEP_BYTES, timeout_s: float | None = None,
              source: tuple | None = None) -> VideoInfo:
        """Decode the whole file once: ``info`` with the frame count (and times) this pass produced.

        Keeps the decoded frames for this decoder when they fit in ``keep_bytes``. ``source``: (a codec
        context not opened yet, the probe's packets in decode order) saves a second demux.
        """
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        with self._lock:
            self._open(source)
            keep = _frame_bytes(self.info) * max(self.info.num_frames, 1) <= keep_bytes
            rotation = 0
            while (item := self._next(deadline, timeout_s)) is not None:
                index, frame = item
                if index == 0:
                    rotation = int(frame.rotation or 0)
                if keep:
                    self._kept[index] = frame
            produced = self._position
        if produced == 0:
            raise VideoDecodeError(self.path, f"no frame decodes ({self.bad_packets} corrupt packet(s))")
        self.info = counted_info(self.info, produced, rotation, self.bad_packets)
        return self.info

    # -- requests ---------------------------------------------------------
    def decode(self, indices: list[int], timeout_s: float | None = None) -> np.ndarray:
        indices = self.info.check_indices(indices)
        self.last_concealed = []
        if not indices:
            return np.zeros((0, *self.size, 3), np.uint8)
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        with self._lock:
            wanted = sorted(set(indices))
            got = {i: self.converter.convert(self._kept[i]) for i in wanted if i in self._kept}
            rest = [i for i in wanted if i not in got]
            if rest:
                if self._frames is None or self._position > rest[0]:
                    self._open()
                lookup = set(rest)
                while self._position <= rest[-1]:
                    item = self._next(deadline, timeout_s)
                    if item is None:
                        break
                    if item[0] in lookup:
                        got[item[0]] = self.converter.convert(item[1])
                replacements = {}
                if self._last is not None and any(i not in got for i in rest):
                    last_index, last_frame = self._last  # only frames past the end are missing here
                    got.setdefault(last_index, self.converter.convert(last_frame))
                    replacements = {i: last_index for i in rest if i not in got}
            else:
                replacements = {}
            frames, self.last_concealed = assemble(self.path, self.info.num_frames, indices, got, replacements,
                                                   self.max_concealed, self.bad_packets)
            return frames

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.info.height, self.info.width
        return (w, h) if quarter_turns(self.info.rotation) % 2 else (h, w)

    def close(self) -> None:
        frames, self._frames = self._frames, None
        if frames is not None:
            frames.close()
        container, self._container = self._container, None
        if container is not None:
            container.close()

    def _release_preloaded(self) -> None:
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None:
            preloaded.close()

    def release(self) -> None:
        """Drop the kept frames, the preloaded packets and the open file."""
        self._kept = {}
        self._release_preloaded()
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.release()
        except Exception:
            pass


def counted_info(info: VideoInfo, produced: int, rotation: int, bad_packets: int) -> VideoInfo:
    """``info`` whose frames are the ``produced`` frames of a full sequential pass (times from the packets)."""
    pts = list(info.frame_pts[:produced])
    if len(pts) < produced:  # more frames than timestamped packets: extend at the mean step
        step = (pts[-1] - pts[0]) // max(len(pts) - 1, 1) if len(pts) > 1 else 1
        pts += [pts[-1] + step * (k + 1) for k in range(produced - len(pts))]
    return dataclasses.replace(info, num_frames=produced, frame_pts=tuple(pts), keyframes=(0,), droppable=(),
                               decode_order=tuple(range(produced)), counted=True, complete=True, rotation=rotation,
                               decode_errors=bad_packets, _pts_index=None)


def count_from_packets(info: VideoInfo, extradata: bytes | None, packets) -> VideoInfo | None:
    """The sequential plan's frame count without decoding, where the bitstream tells it (MPEG-4 Part 2:
    ``video.mpeg4``); None elsewhere (the caller decodes to count)."""
    if info.codec != "mpeg4" or not packets:
        return None
    from video.mpeg4 import count_coded_vops

    produced = count_coded_vops(extradata, packets)
    if not produced:
        return None
    return counted_info(info, produced, rotation=0, bad_packets=0)


def count_frames(info: VideoInfo, timeout_s: float | None = None) -> VideoInfo:
    """``info`` with the frame count of a full sequential pass (for files on the sequential plan)."""
    decoder = SequentialDecoder(info.path, info)
    try:
        return decoder.count(keep_bytes=0, timeout_s=timeout_s)
    finally:
        decoder.release()
