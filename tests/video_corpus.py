"""A differential video corpus: small clips across containers, codecs and stream properties, and real files.

``build_corpus(root)`` writes every generated clip whose encoder this PyAV build has (a few frames
at small sizes: the whole corpus takes a few seconds) and adds opencv-doc's sample videos when they
are on this machine (``make test`` fetches them into ``.cache/opencv-doc``; Debian installs them
under ``/usr/share/doc/opencv-doc/examples/data``). ``reference_frames`` is the reference every
reader is held to: PyAV's sequential decode (frame i = the i-th frame the decoder outputs), with
the frame's own colour range and display rotation applied.

Generated content is ``frame_pattern`` (the red level codes the frame index, a bar moves 3 pixels
per frame), so neighbouring frames always differ.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

from _video_fixtures import frame_pattern, mux_frames, truncated_copy

REPO = Path(__file__).resolve().parent.parent
OPENCV_DOC_DIRS = (REPO / ".cache" / "opencv-doc", Path("/usr/share/doc/opencv-doc/examples/data"))
OPENCV_FILES = ("Megamind.avi", "Megamind_bugy.avi", "vtest.avi")


def opencv_doc_file(name: str) -> Path | None:
    """An opencv-doc sample file (the repo's fetched cache first, then Debian's install), or None."""
    for folder in OPENCV_DOC_DIRS:
        if (folder / name).is_file():
            return folder / name
    return None


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class ClipSpec:
    """One generated clip: encoder, container format, size, pixel format and encoder options."""

    codec: str
    suffix: str
    frames: int = 40
    width: int = 64
    height: int = 48
    pix_fmt: str = "yuv420p"
    options: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)  # codec context attributes (e.g. max_b_frames)
    rotation: int | None = None  # display matrix, counter-clockwise degrees
    pts: tuple[int, ...] | None = None  # variable frame rate: frame timestamps in ``time_base``
    time_base: Fraction | None = None
    container_options: dict = field(default_factory=dict)


def _x264(gop: int, bf: int, **extra) -> dict:
    return {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": str(bf), "crf": "18",
            "preset": "veryfast", **extra}


def _x265(params: str) -> dict:
    return {"preset": "ultrafast", "crf": "20", "x265-params": f"log-level=none:{params}"}


def _vfr_pts(n: int) -> tuple[int, ...]:
    pts = [0]
    for k in range(n - 1):
        pts.append(pts[-1] + (20 if k % 3 else 80))  # 20 ms and 80 ms gaps
    return tuple(pts)


VP = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
SPECS: dict[str, ClipSpec] = {
    "avi_mpeg4": ClipSpec("mpeg4", ".avi", context={"gop_size": 12}),
    "avi_mpeg4_bframes": ClipSpec("mpeg4", ".avi", context={"gop_size": 12, "max_b_frames": 2}),
    "avi_mjpeg": ClipSpec("mjpeg", ".avi", pix_fmt="yuvj420p"),
    "avi_msmpeg4": ClipSpec("msmpeg4", ".avi", context={"gop_size": 12}),
    "mkv_vp8": ClipSpec("libvpx", ".mkv", options={**VP, "g": "12"}),
    "webm_vp9": ClipSpec("libvpx-vp9", ".webm", options={**VP, "g": "20", "auto-alt-ref": "1", "lag-in-frames": "8"}),
    "webm_vp9_853x480": ClipSpec("libvpx-vp9", ".webm", frames=8, width=853, height=480, options=VP),
    "webm_vp9_10bit": ClipSpec("libvpx-vp9", ".webm", pix_fmt="yuv420p10le", options=VP),
    "webm_av1": ClipSpec("libsvtav1", ".webm", width=64, height=64, options={"preset": "12", "g": "16"}),
    "mp4_h264_long_gop_bframes": ClipSpec("libx264", ".mp4", options=_x264(250, 3),
                                          container_options={"movflags": "faststart"}),
    "mp4_h264_short_gop": ClipSpec("libx264", ".mp4", options=_x264(6, 0)),
    "mov_h264_open_gop": ClipSpec("libx264", ".mov", options=_x264(12, 2, **{"x264-params": "open-gop=1"})),
    "mkv_h264_bframes": ClipSpec("libx264", ".mkv", options=_x264(12, 2)),
    "mp4_h264_vfr": ClipSpec("libx264", ".mp4", options=_x264(12, 2), pts=_vfr_pts(40), time_base=Fraction(1, 1000)),
    "mp4_h264_portrait_phone": ClipSpec("libx264", ".mp4", width=48, height=64, options=_x264(12, 2), rotation=-90),
    "mp4_h264_rotated_180": ClipSpec("libx264", ".mp4", options=_x264(12, 0), rotation=180),
    "mp4_h264_full_range": ClipSpec("libx264", ".mp4", pix_fmt="yuvj420p", options=_x264(12, 2)),
    "mp4_h264_10bit": ClipSpec("libx264", ".mp4", pix_fmt="yuv420p10le", options=_x264(12, 2)),
    "mp4_hevc_bframes_open_gop": ClipSpec("libx265", ".mp4", options=_x265("keyint=12:min-keyint=12:bframes=3:open-gop=1")),
    "mp4_hevc_long_gop": ClipSpec("libx265", ".mp4", options=_x265("keyint=250:bframes=2")),
    "mp4_hevc_10bit_full_range": ClipSpec("libx265", ".mp4", pix_fmt="yuv420p10le",
                                          options=_x265("keyint=12:range=full")),
    "mp4_mjpeg": ClipSpec("mjpeg", ".mp4", pix_fmt="yuvj420p"),
    "mp4_vp9": ClipSpec("libvpx-vp9", ".mp4", options={**VP, "g": "20", "auto-alt-ref": "1", "lag-in-frames": "8"}),
    "mp4_av1": ClipSpec("libsvtav1", ".mp4", width=64, height=64, options={"preset": "12", "g": "16"}),
    "mkv_hevc_bframes": ClipSpec("libx265", ".mkv", options=_x265("keyint=12:bframes=3")),
    "mkv_mjpeg": ClipSpec("mjpeg", ".mkv", pix_fmt="yuvj420p"),
}
# clips derived from a generated one: name -> (source, function(src, dst))
DERIVED: dict[str, tuple[str, Callable[[Path, Path], Path]]] = {}


def write_spec(spec: ClipSpec, path: Path) -> Path:
    """Encode ``spec`` to ``path`` with PyAV."""
    fmt = "mov" if spec.suffix == ".mov" else None
    with av.open(str(path), "w", format=fmt, options=spec.container_options) as container:
        stream = container.add_stream(spec.codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
        if spec.options:
            stream.options = dict(spec.options)
        for key, value in spec.context.items():
            setattr(stream.codec_context, key, value)
        if spec.time_base is not None:
            stream.codec_context.time_base = spec.time_base
            stream.time_base = spec.time_base
        if spec.rotation is not None:
            stream.set_display_rotation(spec.rotation)
        def frames():
            for i in range(spec.frames):
                frame = av.VideoFrame.from_ndarray(frame_pattern(i, spec.height, spec.width), format="rgb24")
                if spec.pts is not None:
                    frame.pts, frame.time_base = spec.pts[i], spec.time_base
                yield frame

        mux_frames(container, stream, frames())
    return path


# -- AVI header edits: what real files carry ----------------------------------------------------------
def _avi_count_offsets(data: bytes) -> tuple[int, int]:
    """Offsets of avih's dwTotalFrames and of the video stream header's dwLength."""
    strh = data.index(b"strh")
    while data[strh + 8:strh + 12] != b"vids":
        strh = data.index(b"strh", strh + 4)
    return data.index(b"avih") + 8 + 16, strh + 8 + 32


def avi_header_counts(path: Path) -> tuple[int, int]:
    """(avih dwTotalFrames, video strh dwLength) of an AVI file."""
    data = path.read_bytes()
    return tuple(struct.unpack_from("<I", data, offset)[0] for offset in _avi_count_offsets(data))


def with_avi_frame_count(src: Path, dst: Path, delta: int) -> Path:
    """``src`` with its header frame counts (avih and the video strh) changed by ``delta``."""
    data = bytearray(src.read_bytes())
    for offset in _avi_count_offsets(data):
        struct.pack_into("<I", data, offset, struct.unpack_from("<I", data, offset)[0] + delta)
    dst.write_bytes(bytes(data))
    return dst


def nvop_packet(src_stream_bits: int = 5) -> bytes:
    """An MPEG-4 Part 2 not-coded P-VOP (N-VOP: ``vop_coded`` = 0), as Xvid writes after packed B-frames.

    ``src_stream_bits``: bits of ``vop_time_increment`` (ceil(log2(resolution)); 5 for a 25 fps stream).
    """
    bits = "01" + "0" + "1" + "0" * src_stream_bits + "1" + "0"  # type P, modulo 0, marker, increment, marker, coded=0
    bits += "0" + "1" * (-(len(bits) + 1) % 8)  # MPEG-4 stuffing to the byte boundary
    return b"\x00\x00\x01\xb6" + int(bits, 2).to_bytes(len(bits) // 8, "big")


def with_trailing_nvop(src: Path, dst: Path) -> Path:
    """``src`` (mpeg4 in AVI) remuxed with one more packet at the end, an N-VOP that decodes to no frame:
    the header (and the packet count) then promise one frame more than decodes, like HMDB51's Xvid clips."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="avi") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        last = None
        for packet in inp.demux(stream_in):
            if packet.dts is None:
                continue
            packet.stream = stream_out
            last = (packet.pts, packet.dts)
            out.mux(packet)
        extra = av.Packet(nvop_packet())
        extra.stream = stream_out
        extra.pts, extra.dts = last[0] + 1, last[1] + 1
        extra.time_base = stream_in.time_base
        out.mux(extra)
    return dst


def _vop_type(data: bytes) -> str:
    pos = data.find(b"\x00\x00\x01\xb6")
    return "IPBS"[data[pos + 4] >> 6] if pos >= 0 else "?"


def with_packed_bframes(src: Path, dst: Path) -> Path:
    """``src`` (mpeg4 with B-frames in AVI) rewritten the way DivX 5 / Xvid "packed bitstream" stores it:
    each reference VOP shares its packet with the first B-VOP after it, later B-VOPs keep theirs, and an
    N-VOP placeholder keeps one packet per frame; a "DivX503b1393p" user data tells the decoder. Decodes
    to the same frames as ``src``, but the decoded frames' timestamps come out shuffled (Megamind.avi)."""
    from video.mpeg4 import time_increment_bits

    with av.open(str(src)) as inp:
        stream_in = inp.streams.video[0]
        packets = [bytes(p) for p in inp.demux(stream_in) if p.size]
        bits = time_increment_bits(bytes(stream_in.codec_context.extradata or b"")) or time_increment_bits(packets[0])
        packed: list[bytes] = []
        i = 0
        while i < len(packets):
            j = i + 1
            while j < len(packets) and _vop_type(packets[j]) == "B":
                j += 1
            bs = packets[i + 1:j]
            packed += [packets[i] + bs[0], *bs[1:], nvop_packet(bits)] if bs else [packets[i]]
            i = j
        vop = packed[0].find(b"\x00\x00\x01\xb6")
        packed[0] = packed[0][:vop] + b"\x00\x00\x01\xb2DivX503b1393p" + packed[0][vop:]
        with av.open(str(dst), "w", format="avi") as out:
            stream_out = out.add_stream_from_template(stream_in)
            for k, data in enumerate(packed):
                packet = av.Packet(data)
                packet.stream, packet.pts, packet.dts, packet.time_base = stream_out, k, k, stream_in.time_base
                packet.is_keyframe = _vop_type(data) == "I"
                out.mux(packet)
    return dst


DERIVED.update({
    "avi_mpeg4_packed_bframes": ("avi_mpeg4_bframes", with_packed_bframes),
    "avi_mpeg4_header_over": ("avi_mpeg4", lambda s, d: with_avi_frame_count(s, d, 5)),
    "avi_mpeg4_header_under": ("avi_mpeg4", lambda s, d: with_avi_frame_count(s, d, -5)),
    "avi_mpeg4_nvop_tail": ("avi_mpeg4_bframes", with_trailing_nvop),
    "avi_mpeg4_packed_nvop_tail": ("avi_mpeg4_packed_bframes", with_trailing_nvop),  # HMDB51's Xvid clips
    "mp4_h264_cut": ("mp4_h264_long_gop_bframes", lambda s, d: truncated_copy(s, d, 0.7)),
})


def build_corpus(root: Path) -> dict[str, Path]:
    """Every clip this machine can make or find: name -> path (generated ones written under ``root``)."""
    root = Path(root)
    out: dict[str, Path] = {}
    for name, spec in SPECS.items():
        if not has_encoder(spec.codec):
            continue
        try:
            out[name] = write_spec(spec, root / f"{name}{spec.suffix}")
        except (av.FFmpegError, ValueError):  # e.g. an 8-bit-only build of the encoder
            continue
    for name, (source, make) in DERIVED.items():
        if source in out:
            out[name] = make(out[source], root / f"{name}{out[source].suffix}")
    for name in OPENCV_FILES:
        path = opencv_doc_file(name)
        if path is not None:
            out[name] = path
    return out


def to_rgb(frame) -> np.ndarray:
    """The reference conversion: the frame's own colour range, rgb24, turned upright by its display matrix."""
    colour = int(frame.color_range)
    rgb = frame.to_ndarray(format="rgb24", src_color_range=colour if colour in (1, 2) else None)
    turns = int(round((frame.rotation or 0) / 90)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def decoded_count(path: str | os.PathLike) -> int:
    """Frames PyAV's sequential decode outputs (errors on single packets skipped, as ffmpeg's CLI does)."""
    count = 0
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                count += len(stream.decode(packet if packet.size else None))
            except av.FFmpegError:
                continue
    return count


def reference_frames(path: str | os.PathLike, indices) -> np.ndarray:
    """uint8 (T,H,W,3): frames ``indices`` of PyAV's sequential decode (see :func:`to_rgb`)."""
    wanted = sorted({int(i) for i in indices})
    got: dict[int, np.ndarray] = {}
    position = 0
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames = stream.decode(packet if packet.size else None)
            except av.FFmpegError:
                continue
            for frame in frames:
                if position in wanted:
                    got[position] = to_rgb(frame)
                position += 1
            if wanted and position > wanted[-1]:
                break
    return np.stack([got[int(i)] for i in indices])
