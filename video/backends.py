"""decord and the backend choice; PyAV requests go to the file's plan (``video.plan``).

These run inside the decode worker process (``video.worker``) and import no torch.
They take a :class:`~video.probe.VideoInfo`, so indices are already checked
against the frames that exist. :func:`decode_frames` serves the worker and
in-process requests that are not served by a reader's own decoder: PyAV by the
plan (packets or sequential), decord only where ``video.plan.decord_refusal`` lets it.

:func:`decode_pyav` is the older seek-based PyAV decoder (container seeks to key frames,
frames placed by timestamp). It is exact only where the packets plan is (the tests use it as
a second, independent reading of such files); no request path uses it any more.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from video.errors import VideoDecodeError
from video.probe import VideoInfo

BACKENDS = ("decord", "pyav")
_MODULES = {"decord": "decord", "pyav": "av"}


def available_backends() -> list[str]:
    """Backends importable here, in order of preference."""
    return [name for name in BACKENDS if importlib.util.find_spec(_MODULES[name]) is not None]


@dataclass(frozen=True)
class DecodeCost:
    """CPU cost (ms) per unit of work at 320x240, measured by bench/video.py on this machine; only ratios matter.

    Frame costs scale with the pixel count. decord decodes every frame it passes;
    the PyAV decoder skips unwanted non-reference frames (see ``plan_decodes``).
    """

    pyav_frame: float = 0.38      # decode one H.264 frame with PyAV, one thread
    pyav_seek: float = 1.0        # one seek + decoder flush
    decord_frame: float = 0.42    # decode one frame inside decord get_batch
    decord_seek: float = 1.0
    decord_open: float = 4.0      # building decord's VideoReader (frame index, first frame)
    pixels_ref: int = 320 * 240


def plan_decodes(info: VideoInfo, wanted: list[int], seek_cost_frames: float,
                 skip_droppable: bool = False) -> tuple[int, int]:
    """(frames decoded, seeks) for reading sorted unique ``wanted`` with the forward/seek rule.

    ``skip_droppable`` leaves out the unwanted non-reference frames (PyAV decoder);
    decord decodes every frame it passes.
    """
    decoded = 0
    seeks = 0
    pos = -1  # index of the last decoded frame
    for target in wanted:
        key = info.keyframe_before(target)
        if key > pos + seek_cost_frames or target <= pos:
            if pos >= 0 or key > 0:  # decoding from the very start needs no seek
                seeks += 1
            first = key
        else:
            first = pos + 1
        decoded += target - first + 1
        if skip_droppable and target > first:
            decoded -= info.droppable_between(first, target - 1)
        pos = target
    return decoded, seeks


def choose_backend(info: VideoInfo, indices: list[int], available: list[str], cost: DecodeCost = DecodeCost()) -> str:
    """The cheaper backend for this request under ``cost`` (PyAV when decord is missing)."""
    if "decord" not in available:
        return "pyav"
    if "pyav" not in available:
        return "decord"
    if info.sequential:
        return "pyav"
    wanted = sorted(set(indices))
    scale = max(info.width * info.height, 1) / cost.pixels_ref
    pa_frames, pa_seeks = plan_decodes(info, wanted, cost.pyav_seek / cost.pyav_frame, skip_droppable=True)
    de_frames, de_seeks = plan_decodes(info, wanted, 0.0)
    pyav = pa_frames * cost.pyav_frame * scale + pa_seeks * cost.pyav_seek
    decord = de_frames * cost.decord_frame * scale + de_seeks * cost.decord_seek + cost.decord_open * scale
    return "pyav" if pyav <= decord else "decord"


def _frame_index(info: VideoInfo, frame, previous: int) -> int:
    pts = frame.pts
    if pts is not None and not info.sequential:
        found = info.index_of_pts(pts)
        if found is not None:
            return found
    return previous + 1  # no usable pts: count frames from the last known one


def decode_pyav(info: VideoInfo, indices: list[int], seek_cost_frames: float = 4.0, threads: int = 1,
                skip_droppable: bool = True) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) as uint8 (T,H,W,3) with the planned PyAV decoder.

    ``skip_droppable``: packets of non-reference frames that are not wanted are
    never sent to the decoder (about half the frames of an x264 file with B-frames).
    """
    import av

    indices = info.check_indices(indices)
    wanted = sorted(set(indices))
    wanted_lookup = set(wanted)
    droppable = frozenset(info.droppable)
    got: dict[int, np.ndarray] = {}
    try:
        container = av.open(info.path, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as err:
        raise VideoDecodeError(info.path, f"cannot open with PyAV ({err})") from None
    bad_packets = 0
    attempts: dict[int, int] = {}
    with container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if threads != 1:  # 0 = one per core
            ctx.thread_count = max(int(threads), 0)
            ctx.thread_type = "AUTO"
        else:
            ctx.thread_count = 1
            ctx.thread_type = "NONE"
        pos = -1  # index of the last decoded frame (-1: at the stream start, nothing decoded)
        cursor = 0  # position in `wanted` of the next frame to collect
        while cursor < len(wanted):
            target = wanted[cursor]
            attempts[target] = attempts.get(target, 0) + 1
            if attempts[target] > 2:  # seeked twice and never saw it: damaged data
                cursor += 1
                continue
            key = info.keyframe_before(target)
            if info.sequential:
                if pos >= 0:
                    break  # one forward pass only: timestamps cannot place a seek
            elif key > pos + seek_cost_frames or target <= pos:
                container.seek(info.frame_pts[key], stream=stream, backward=True, any_frame=False)
                pos = key - 1
            need_seek = False
            try:
                for packet in container.demux(stream):
                    if skip_droppable and droppable and packet.size and packet.pts is not None:
                        idx = info.index_of_pts(packet.pts)
                        if idx is not None and idx in droppable and idx not in wanted_lookup:
                            continue  # nothing references this frame and nobody wants it: never decode it
                    try:
                        frames = stream.decode(packet)  # the final empty packet flushes the decoder
                    except av.FFmpegError:
                        bad_packets += 1  # corrupt packet: skip it, later frames may still decode
                        continue
                    for frame in frames:
                        pos = _frame_index(info, frame, pos)
                        if pos in wanted_lookup and pos not in got:
                            got[pos] = frame.to_ndarray(format="rgb24")
                        while cursor < len(wanted) and wanted[cursor] in got:
                            cursor += 1
                        if cursor >= len(wanted):
                            break
                        nxt = wanted[cursor]
                        if info.sequential:
                            continue
                        if nxt < pos or info.keyframe_before(nxt) > pos + seek_cost_frames:
                            need_seek = True  # passed a frame without it (damaged), or a seek is cheaper
                            break
                    if cursor >= len(wanted) or need_seek:
                        break
            except av.FFmpegError:
                bad_packets += 1
            if not need_seek:
                break  # end of stream: whatever is still missing cannot be decoded
    return stack_decoded(info.path, info.num_frames, indices, got, bad_packets)


def stack_decoded(path: str, num_frames: int, indices: list[int], got: dict[int, np.ndarray],
                  bad_packets: int) -> np.ndarray:
    """(T, H, W, 3) uint8 of ``indices`` from the decoded frames ``got``; a VideoDecodeError naming
    the frames that could not be decoded (and the corrupt-packet count) if any is missing."""
    missing = sorted({i for i in indices if i not in got})
    if missing:
        raise VideoDecodeError(
            path,
            f"frames {missing[:8]} of {num_frames} could not be decoded "
            f"({bad_packets} corrupt packet(s); the data is damaged)",
        )
    return np.stack([got[i] for i in indices])


def decode_decord(info: VideoInfo, indices: list[int], threads: int = 1, check_timestamps: bool = True) -> np.ndarray:
    """Frames ``indices`` as uint8 (T,H,W,3) with decord ``get_batch``, after checking decord agrees on the frames.

    Raises VideoDecodeError when decord sees a different frame count or returns
    frames whose timestamps differ from the probe's (wrong frames after a seek).
    """
    import decord

    indices = info.check_indices(indices)
    if info.sequential:
        raise VideoDecodeError(info.path, "packet timestamps are missing or repeated; decord's get_batch hangs on "
                                          "such files (decord issue 373), use the PyAV backend")
    try:
        reader = decord.VideoReader(info.path, ctx=decord.cpu(0), num_threads=max(int(threads), 1))
    except (decord.DECORDError, RuntimeError) as err:
        raise VideoDecodeError(info.path, f"decord cannot open it ({str(err).splitlines()[-1][:200]})") from None
    try:
        if len(reader) < max(indices) + 1:
            raise VideoDecodeError(info.path, f"decord sees {len(reader)} frames, the probe {info.num_frames}")
        if check_timestamps:
            stamps = reader.get_frame_timestamp(indices)[:, 0]
            expect = np.array([float(info.frame_pts[i] * info.time_base) for i in indices])
            tolerance = 0.5 / max(info.fps, 1.0)
            if np.abs(stamps - expect).max() > tolerance:
                raise VideoDecodeError(info.path, "decord maps indices to other frames than the container's timestamps")
        try:
            return reader.get_batch(indices).asnumpy()
        except (decord.DECORDError, RuntimeError) as err:
            raise VideoDecodeError(info.path, f"decord failed ({str(err).splitlines()[-1][:200]})") from None
    finally:
        del reader


def decode_frames(info: VideoInfo, indices, backend: str = "auto", cost: DecodeCost = DecodeCost(),
                  max_concealed: float = 0.25) -> tuple[np.ndarray, str, list[int]]:
    """Decode ``indices`` with ``backend`` ("auto" picks the cheaper one per request).

    Returns (frames uint8 (T,H,W,3), backend used, concealed indices). PyAV decodes by the file's
    plan (``video.plan``). decord only runs where the plan trusts it (``decord_refusal``): a named
    "decord" on another file raises VideoDecodeError saying why; under "auto" such files, and decord
    failures, go to PyAV.
    """
    from video.plan import decode_planned, decord_refusal

    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of: auto, {', '.join(BACKENDS)}")
    indices = info.check_indices(indices)
    if not indices:
        return np.zeros((0, info.height, info.width, 3), np.uint8), "none", []
    available = available_backends()
    if backend != "auto" and backend not in available:
        raise ValueError(f"backend {backend!r} is not installed; available: {', '.join(available) or 'none'}")
    refusal = decord_refusal(info) if "decord" in available else "decord is not installed"
    if backend == "decord":
        if refusal is not None:
            raise VideoDecodeError(info.path, f"{refusal}; use backend 'pyav' or 'auto'")
        return decode_decord(info, indices), "decord", []
    if backend == "auto" and refusal is None and choose_backend(info, indices, available, cost) == "decord":
        try:
            return decode_decord(info, indices), "decord", []
        except VideoDecodeError:
            pass  # decord disagrees with the container or fails on it: PyAV decodes what exists
    frames, concealed, _ = decode_planned(info, indices, max_concealed=max_concealed)
    return frames, "pyav", concealed
