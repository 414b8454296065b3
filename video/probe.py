"""Probe a video file by demuxing its packets (no decoding): the frames that really exist.

Containers can over-report their frame count (a truncated file, a wrong header):
decord's ``get_batch`` on such a file may hang holding the GIL (decord issue 373).
The probe counts the complete packets of the first video stream, so every index
handed to a decoder afterwards is one that has data behind it. Demuxing reads the
packet index and the bytes but decodes nothing: a few ms for a short clip.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction

from video.errors import VideoDecodeError


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds, in presentation order.

    ``frame_pts[i]`` is the pts (in ``time_base`` units) of frame ``i``;
    ``keyframes`` are the indices of key frames (sorted); ``droppable`` the
    indices of frames no other frame references (H.264 ``nal_ref_idc == 0``,
    HEVC sub-layer non-reference), which a decoder may skip when they are not
    wanted; ``sequential`` marks a file whose packet timestamps are missing or
    repeated: its frames are numbered in decode order, ``frame_pts`` are
    synthetic (mean frame rate) and only a forward pass reads it; ``reported_frames`` is what the container header claims (0 when
    unknown) and may exceed ``num_frames``; ``decode_order[k]`` is the frame index of the k-th
    complete packet in the file; ``slices`` the coded slices of the first key frame (1 when
    unknown), which a slice-threaded decoder can decode in parallel.
    """

    path: str
    num_frames: int
    reported_frames: int
    width: int
    height: int
    codec: str
    time_base: Fraction
    frame_pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    droppable: tuple[int, ...] = ()
    sequential: bool = False
    corrupt_packets: int = 0
    size_bytes: int = 0
    mtime_ns: int = 0
    decode_order: tuple[int, ...] = ()  # frame index of each packet, in decode (file) order
    slices: int = 1
    container: str = ""  # demuxer name, e.g. "avi", "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2"
    pix_fmt: str = ""  # the decoder's pixel format, e.g. "yuv420p", "yuvj420p", "yuv420p10le"
    rotation: int = 0  # display rotation, counter-clockwise degrees (phones: -90 / 90); frames come out upright
    counted: bool = False  # num_frames is what a full sequential decode produced (the sequential plan)
    complete: bool = False  # rotation (and, on the sequential plan, the count) came from decoded frames
    open_gop: bool = False  # a key frame is not an IDR (H.264 recovery point, HEVC CRA/BLA): leading frames
                            # after it reference the previous GOP
    decode_errors: int = 0  # packets the counting pass could not decode
    _pts_index: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last (one mean frame period added)."""
        if self.num_frames < 2:
            return float(self.num_frames) / 25.0
        span = float((self.frame_pts[-1] - self.frame_pts[0]) * self.time_base)
        return span * self.num_frames / (self.num_frames - 1)

    @property
    def fps(self) -> float:
        """Mean frame rate (frames / duration); exact for constant-rate files."""
        d = self.duration
        return self.num_frames / d if d > 0 else 25.0

    @property
    def is_variable_rate(self) -> bool:
        """True when frame intervals differ by more than 10% of the mean."""
        if self.num_frames < 3:
            return False
        gaps = [b - a for a, b in zip(self.frame_pts, self.frame_pts[1:])]
        mean = sum(gaps) / len(gaps)
        return max(gaps) - min(gaps) > 0.1 * mean

    @property
    def unsafe_reason(self) -> str | None:
        """Why this file is decoded only behind the process watchdog, or None when in-process decoding is safe.

        Safe: every packet is complete, and either the frames were counted by decoding (or from the
        bitstream: the sequential plan) or every packet is timestamped and the container's frame count
        (when it has one) equals the packets found, i.e. nothing a decoder could wait for is missing.
        """
        damage = self.damage_reason
        if damage is not None:
            return damage
        if self.counted:
            return None  # frames counted by decoding (or from the bitstream): no decoder waits for a promised one
        if self.sequential:
            return "packet timestamps are missing or repeated"
        if self.reported_frames not in (0, self.num_frames):
            return f"the container claims {self.reported_frames} frames, {self.num_frames} exist"
        if len(self.decode_order) != self.num_frames:
            return "no packet order recorded"
        return None

    @property
    def damage_reason(self) -> str | None:
        """Why the data itself is damaged (cut or corrupt packets, packets that failed to decode), or None."""
        if self.corrupt_packets:
            return f"{self.corrupt_packets} corrupt or cut packet(s)"
        if self.decode_errors:
            return f"{self.decode_errors} packet(s) failed to decode"
        return None

    def frame_time(self, index: int) -> float:
        """Seconds from the first frame to frame ``index``."""
        return float((self.frame_pts[index] - self.frame_pts[0]) * self.time_base)

    def index_of_pts(self, pts: int) -> int | None:
        """Frame index for a decoded frame's pts, or None when no packet had that pts."""
        index = self._pts_index
        if index is None:
            index = {p: i for i, p in enumerate(self.frame_pts)}
            object.__setattr__(self, "_pts_index", index)
        return index.get(pts)

    def keyframe_before(self, index: int) -> int:
        """The last key frame at or before frame ``index`` (0 when none)."""
        pos = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[pos] if pos >= 0 else 0

    def droppable_between(self, first: int, last: int) -> int:
        """How many droppable frames have an index in ``[first, last]``."""
        return bisect.bisect_right(self.droppable, last) - bisect.bisect_left(self.droppable, first)

    def check_indices(self, indices) -> list[int]:
        """Indices as ints, each in ``[0, num_frames)``; ValueError naming the bad ones."""
        out = [int(i) for i in indices]
        bad = [i for i in out if i < 0 or i >= self.num_frames]
        if bad:
            raise ValueError(
                f"frame indices {bad[:8]} out of range for {self.path!r}: "
                f"valid indices are 0..{self.num_frames - 1} ({self.num_frames} decodable frames"
                + (f", the container claims {self.reported_frames}" if self.reported_frames != self.num_frames else "")
                + ")"
            )
        return out


def _nal_length_size(codec: str, extradata: bytes | None) -> int:
    """Bytes of the NAL length prefix in MP4-style (avcC / hvcC) packets; 0 when not length-prefixed."""
    if not extradata or extradata[0] != 1:
        return 0  # Annex B start codes, or unknown: no droppable detection
    if codec == "h264" and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) > 21:
        return (extradata[21] & 3) + 1
    return 0


def count_slices(data: memoryview, codec: str, length_size: int) -> int:
    """Coded slice NAL units in a length-prefixed H.264 / HEVC packet (0 when none is found)."""
    pos, end, slices = 0, len(data), 0
    while pos + length_size < end:
        size = int.from_bytes(data[pos:pos + length_size], "big")
        header = data[pos + length_size]
        if codec == "h264":
            slices += (header & 0x1F) in (1, 5)
        else:
            slices += ((header >> 1) & 0x3F) < 32
        if size <= 0:
            break
        pos += length_size + size
    return slices


def is_non_reference(data: memoryview, codec: str, length_size: int) -> bool:
    """True when every coded slice in the packet is a non-reference picture."""
    pos, end, slices = 0, len(data), 0
    while pos + length_size < end:
        size = int.from_bytes(data[pos:pos + length_size], "big")
        header = data[pos + length_size]
        if codec == "h264":
            nal_type, ref_idc = header & 0x1F, (header >> 5) & 3
            if nal_type in (1, 5):  # coded slice (non-IDR / IDR)
                if ref_idc != 0:
                    return False
                slices += 1
        else:  # hevc: VCL types 0..31; even types below 16 are sub-layer non-reference
            nal_type = (header >> 1) & 0x3F
            if nal_type < 32:
                if nal_type > 14 or nal_type % 2 == 1:
                    return False
                slices += 1
        if size <= 0:
            return False
        pos += length_size + size
    return slices > 0


def is_open_gop_key(data: memoryview, codec: str, length_size: int) -> bool:
    """True when a key-frame packet codes no IDR picture (H.264 I slice with a recovery point, HEVC CRA/BLA)."""
    pos, end = 0, len(data)
    vcl = []
    while pos + length_size < end:
        size = int.from_bytes(data[pos:pos + length_size], "big")
        header = data[pos + length_size]
        if codec == "h264":
            nal_type = header & 0x1F
            if nal_type in (1, 5):
                vcl.append(nal_type == 5)
        else:
            nal_type = (header >> 1) & 0x3F
            if nal_type < 32:
                vcl.append(nal_type in (19, 20))  # IDR_W_RADL, IDR_N_LP
        if size <= 0:
            break
        pos += length_size + size
    return bool(vcl) and not all(vcl)


def probe_video(path: str | os.PathLike, deadline: float | None = None) -> VideoInfo:
    """Demux ``path`` and return its :class:`VideoInfo`; VideoDecodeError when it has no decodable video.

    Files on the sequential plan (``video.plan``) are decoded once to count their frames; others get
    their display rotation from the first frame. ``deadline`` (``time.monotonic()`` seconds) bounds
    the work: past it, VideoDecodeError.
    """
    import time

    container = open_container(path)
    with container:
        streams = container.streams.video
        bitstream_count = bool(streams) and streams[0].codec_context.name == "mpeg4"
        info, packets = scan_packets(container, os.fspath(path), keep_packets=bitstream_count, deadline=deadline)
        if bitstream_count:
            from video.sequential import count_from_packets

            counted = count_from_packets(info, streams[0].codec_context.extradata, packets)
            if counted is not None:
                return counted
    return complete_probe(info, None if deadline is None else max(deadline - time.monotonic(), 0.001))


def complete_probe(info: VideoInfo, timeout_s: float | None = None) -> VideoInfo:
    """What the demux cannot tell: the decoded frame count (sequential plan) or the rotation (first frame)."""
    from video.plan import choose_plan

    if info.complete:
        return info
    if choose_plan(info).kind == "sequential":
        from video.sequential import count_frames

        return count_frames(info, timeout_s=timeout_s)
    import av

    try:
        with open_container(info.path) as container:
            for frame in container.decode(video=0):
                return replace(info, rotation=int(frame.rotation or 0), complete=True)
    except (av.FFmpegError, VideoDecodeError):
        pass  # the frames themselves will say what is wrong
    return replace(info, complete=True)


def open_container(path: str | os.PathLike):
    """``av.open(path)`` with its failures as VideoDecodeError naming the file."""
    import av  # local: keeps `import video` cheap

    path = os.fspath(path)
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise VideoDecodeError(path, f"cannot read file ({err.strerror or err})") from None
    if size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as err:
        raise VideoDecodeError(path, f"not a readable media container ({err})") from None


def scan_packets(container, path: str, keep_packets: bool = False,
                 deadline: float | None = None) -> tuple[VideoInfo, list]:
    """Demux the first video stream of an open ``container``: (VideoInfo, packets in decode order).

    The packets (``av.Packet``, complete ones only, aligned with ``info.decode_order``)
    are returned when ``keep_packets``, else an empty list.
    """
    import time

    import av

    stat = os.stat(path)
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if stream.time_base is None:
        raise VideoDecodeError(path, "video stream has no time base")
    codec = str(ctx.name)
    length_size = _nal_length_size(codec, ctx.extradata) if codec in ("h264", "hevc") else 0
    packets: list[tuple[int | None, bool, bool]] = []  # (pts, key, droppable) in decode order
    kept: list = []
    corrupt = 0
    slices = 0
    open_gop = False
    try:
        for count, packet in enumerate(container.demux(stream)):
            if deadline is not None and count % 64 == 63 and time.monotonic() > deadline:
                raise VideoDecodeError(path, "reading the packet index timed out")
            if packet.size == 0:
                continue  # flush packet at the end of the stream
            if packet.is_corrupt:
                corrupt += 1  # cut short by truncation: its frame cannot be decoded
                continue
            key = bool(packet.is_keyframe)
            if key and not slices and length_size:
                slices = count_slices(memoryview(packet), codec, length_size)
            if key and length_size and not open_gop:
                open_gop = is_open_gop_key(memoryview(packet), codec, length_size)
            drop = not key and bool(length_size) and is_non_reference(memoryview(packet), codec, length_size)
            packets.append((packet.pts, key, drop))
            if keep_packets:
                kept.append(packet)
    except av.FFmpegError:
        corrupt += 1  # demuxer gave up part-way: keep the packets read so far
    if not packets:
        raise VideoDecodeError(path, "no decodable video frames (zero frames, or the data is missing)")
    pts_values = [p for p, _, _ in packets]
    sequential = None in pts_values or len(set(pts_values)) != len(pts_values)
    time_base = Fraction(stream.time_base)
    if sequential:
        # missing or repeated timestamps: frames can only be counted in decode order and read
        # by one forward pass (decord's get_batch hangs on such files); times from the mean rate
        rates = [Fraction(r) for r in (stream.guessed_rate, stream.average_rate) if r and 0 < r <= 240]
        time_base = 1 / rates[0] if rates else Fraction(1, 25)
        pts_list = list(range(len(packets)))
        decode_order = list(pts_list)
        keyframes = [i for i, (_, key, _) in enumerate(packets) if key]
        droppable: list[int] = []
    else:
        pts_list = sorted(pts_values)
        rank = {p: i for i, p in enumerate(pts_list)}
        decode_order = [rank[p] for p in pts_values]
        keyframes = sorted(rank[p] for p, key, _ in packets if key)
        droppable = sorted(rank[p] for p, _, drop in packets if drop)
    if not keyframes or keyframes[0] != 0:
        keyframes = [0] + keyframes  # decoding always starts at the stream start
    info = VideoInfo(
        path=path,
        num_frames=len(pts_list),
        reported_frames=int(stream.frames or 0),
        width=int(ctx.width or 0),
        height=int(ctx.height or 0),
        codec=codec,
        time_base=time_base,
        frame_pts=tuple(pts_list),
        keyframes=tuple(keyframes),
        droppable=tuple(droppable),
        sequential=sequential,
        corrupt_packets=corrupt,
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        decode_order=tuple(decode_order),
        slices=max(slices, 1),
        container=str(container.format.name),
        pix_fmt=str(ctx.pix_fmt or ""),
        open_gop=open_gop,
    )
    return info, kept
