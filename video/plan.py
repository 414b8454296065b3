"""How a file is decoded: a fast path only where the corpus test proves it frame-exact, else one forward pass.

The reference is PyAV's sequential decode: frame ``i`` is the ``i``-th frame the decoder outputs
(what torchvision's and mmaction2's PyAV readers return). Two ways to get there:

- ``"packets"`` (fast): the packets are decoded from memory with restarts at key frames, frames are
  placed by their timestamps and unwanted non-reference frames are never decoded
  (``video.packets``). Exact only where every packet is one shown frame whose timestamp the decoder
  hands back unchanged. ``tests/test_video_corpus.py`` proves it for the pairs in
  :data:`FAST_PATHS`; decord (which indexes the same way) is trusted on the subset in
  :data:`DECORD_PATHS`, where the corpus shows it pixel-equal to PyAV.
- ``"sequential"``: one forward pass that numbers the frames as they come out
  (``video.sequential``); the frame count is what that pass produced, never the header. Everything
  else takes it: AVI with MPEG-4 Part 2 (packed B-frames and N-VOP placeholders break the
  packet-to-frame mapping: Xvid/DivX files such as HMDB51's, UCF101's and opencv-doc's
  ``Megamind.avi``), msmpeg4, files without usable timestamps, any codec not listed.
"""
from __future__ import annotations

from dataclasses import dataclass

from video.probe import VideoInfo

# (container family, decoder) pairs whose packet decoding the corpus proves equal to the sequential decode
MP4 = "mov,mp4,m4a,3gp,3g2,mj2"
MATROSKA = "matroska,webm"
# (AV1 decodes with libdav1d, the decoder FFmpeg picks when it has it)
FAST_PATHS: frozenset[tuple[str, str]] = frozenset(
    [(MP4, c) for c in ("h264", "hevc", "mjpeg", "vp9", "libdav1d")]
    + [(MATROSKA, c) for c in ("h264", "hevc", "vp8", "vp9", "libdav1d", "mjpeg")]
    + [("avi", "mjpeg")]  # intra-only: packet i is frame i
)
# decord: the same pairs, 8-bit 4:2:0 only (its 10-bit conversion differs), AV1 never (decord fails on it),
# never on open GOPs, rotated or damaged files (see ``decord_refusal``)
DECORD_PATHS: frozenset[tuple[str, str]] = frozenset(
    (fmt, codec) for fmt, codec in FAST_PATHS if codec in ("h264", "hevc", "vp8", "vp9"))
DECORD_PIXEL_FORMATS = ("yuv420p", "yuvj420p")


@dataclass(frozen=True)
class DecodePlan:
    """``kind`` "packets" (key-frame restarts, timestamps) or "sequential" (one forward pass), and ``reason``.

    ``decord_ok``: decord returns the same frames here (its own index and conversion agree with PyAV's).
    """

    kind: str
    reason: str
    decord_ok: bool = False

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


def choose_plan(info: VideoInfo) -> DecodePlan:
    """The decode plan for a probed file (see the module docstring)."""
    pair = (info.container, info.codec)
    where = f"{info.codec} in {info.container or 'an unknown container'}"
    if info.sequential:
        return DecodePlan("sequential", "packet timestamps are missing or repeated: frames numbered as decoded")
    if pair not in FAST_PATHS:
        return DecodePlan("sequential", f"{where} is not proven frame-exact with key-frame restarts "
                                        "(tests/test_video_corpus.py): one forward pass")
    decord = (pair in DECORD_PATHS and info.pix_fmt in DECORD_PIXEL_FORMATS and info.complete
              and not info.rotation % 360 and not info.open_gop and info.unsafe_reason is None)
    return DecodePlan("packets", f"{where}: key-frame restarts and timestamps proven exact by the corpus test",
                      decord_ok=decord)


def decord_refusal(info: VideoInfo) -> str | None:
    """Why decord may not decode this file (its frames would differ from the reference), or None."""
    plan = choose_plan(info)
    if plan.decord_ok:
        return None
    if plan.kind != "packets":
        return f"decord places frames by timestamp, which this file's do not give ({plan.reason})"
    if info.unsafe_reason is not None:
        return f"the file is damaged ({info.unsafe_reason}): decord may hang or return other frames"
    if not info.complete:
        return "the display rotation is not probed yet (probe_video)"
    if info.open_gop:
        return "decord returns wrong frames after seeking to an open-GOP key frame"
    if info.rotation % 360:
        return f"decord ignores the display rotation ({info.rotation} degrees)"
    if info.pix_fmt not in DECORD_PIXEL_FORMATS:
        return f"decord converts {info.pix_fmt or 'this pixel format'} to RGB differently from PyAV"
    return f"decord is not proven frame-exact on {info.codec} in {info.container}"


def open_planned(info: VideoInfo, threads: int | str = 1, max_concealed: float = 0.25, allow_unsafe: bool = False):
    """The PyAV decoder of ``info``'s plan: a PacketDecoder (lazy demux) or a SequentialDecoder."""
    if choose_plan(info).kind == "packets":
        from video.packets import PacketDecoder

        return PacketDecoder(info.path, threads=threads, info=info, allow_unsafe=allow_unsafe,
                             max_concealed=max_concealed)
    from video.sequential import SequentialDecoder

    return SequentialDecoder(info.path, info, max_concealed=max_concealed)


def decode_planned(info: VideoInfo, indices: list[int], max_concealed: float = 0.25,
                   timeout_s: float | None = None):
    """(frames uint8 (T,H,W,3), concealed indices, info) with the plan's decoder, in this process.

    A file whose packets turn out not to map onto its frames (``PlanMismatch``) is counted and read
    by the sequential plan instead; the returned ``info`` is then the counted one.
    """
    from video.packets import PlanMismatch
    from video.sequential import SequentialDecoder, count_frames

    decoder = open_planned(info, max_concealed=max_concealed, allow_unsafe=True)
    try:
        try:
            return decoder.decode(indices, timeout_s=timeout_s), decoder.last_concealed, info
        except PlanMismatch:
            decoder.close()
            info = count_frames(info, timeout_s=timeout_s)
            decoder = SequentialDecoder(info.path, info, max_concealed=max_concealed)
            return decoder.decode(indices, timeout_s=timeout_s), decoder.last_concealed, info
    finally:
        release = getattr(decoder, "release", None) or decoder.close
        release()
