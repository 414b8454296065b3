"""Differential test: every corpus clip, every backend and isolation mode, TSN / dense / random indices,
equal to PyAV's sequential decode to the pixel (tests/video_corpus.py builds the clips)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from video import VideoDecodeError, open_video, probe_video
from video.decode import PROBE_CACHE
from video.plan import FAST_PATHS, choose_plan, decord_refusal
from video.sampling import DenseSampler, TSNSampler
from video_corpus import DERIVED, OPENCV_FILES, SPECS, build_corpus, decoded_count, reference_frames

NAMES = list(SPECS) + list(DERIVED) + list(OPENCV_FILES)


@dataclass
class Reference:
    count: int
    indices: dict[str, list[int]]
    frames: dict[str, np.ndarray]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, object]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def references() -> dict[str, Reference]:
    return {}


def reference(corpus, references, name: str) -> Reference:
    if name not in corpus:
        pytest.skip(f"{name}: no encoder for it in this PyAV build, or the opencv-doc file is absent "
                    "(make test fetches it into .cache/opencv-doc)")
    if name not in references:
        path = corpus[name]
        count = decoded_count(path)
        g = torch.Generator().manual_seed(len(name))
        indices = {
            "tsn": TSNSampler(8)(count).indices.tolist(),
            "dense": DenseSampler(8, stride=2)(count).indices.tolist(),
            "random": torch.randint(count, (8,), generator=g).tolist(),  # unsorted, repeats allowed
        }
        frames = {kind: reference_frames(path, idx) for kind, idx in indices.items()}
        references[name] = Reference(count, indices, frames)
    return references[name]


def _diff(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    per_frame = np.abs(a.astype(np.int16) - b).reshape(len(a), -1).mean(1)
    return f"mean |diff| per frame {np.round(per_frame, 2).tolist()}"


@pytest.mark.parametrize("isolation", ["auto", "inline", "process"])
@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
@pytest.mark.parametrize("name", NAMES)
def test_reader_equals_sequential_decode(corpus, references, name, backend, isolation):
    ref = reference(corpus, references, name)
    with open_video(corpus[name], backend=backend, isolation=isolation) as reader:
        assert len(reader) == ref.count, f"{name}: {len(reader)} frames, sequential decode gives {ref.count}"
        refusal = decord_refusal(reader.info) if backend == "decord" else None
        for kind, indices in ref.indices.items():
            if refusal is not None:
                with pytest.raises(VideoDecodeError, match="use backend 'pyav' or 'auto'"):
                    reader.get_frames(indices)
                continue
            frames = reader.get_frames_numpy(indices)
            assert np.array_equal(frames, ref.frames[kind]), \
                f"{name} [{reader.plan}] {kind} {indices}: {_diff(frames, ref.frames[kind])}"
            assert reader.last_concealed == []
            if backend != "auto":
                assert reader.last_backend == backend


@pytest.mark.parametrize("name", NAMES)
def test_decord_is_trusted_only_where_it_agrees(corpus, references, name):
    """The plan lets decord decode a file only where decord's own frames equal the reference."""
    decord = pytest.importorskip("decord")
    ref = reference(corpus, references, name)
    reader = open_video(corpus[name], isolation="process")
    if decord_refusal(reader.info) is not None:
        return  # never used there; nothing to check
    vr = decord.VideoReader(str(corpus[name]))
    assert len(vr) == ref.count
    for kind, indices in ref.indices.items():
        assert np.array_equal(vr.get_batch(indices).asnumpy(), ref.frames[kind]), f"{name} {kind}"


def test_plans_follow_the_proven_pairs(corpus):
    if "avi_mpeg4_bframes" not in corpus or "mp4_h264_long_gop_bframes" not in corpus:
        pytest.skip("mpeg4 or libx264 encoder missing")
    avi = open_video(corpus["avi_mpeg4_bframes"])
    assert avi.plan.kind == "sequential" and "mpeg4 in avi" in avi.plan.reason
    mp4 = open_video(corpus["mp4_h264_long_gop_bframes"])
    assert mp4.plan.kind == "packets" and (mp4.info.container, mp4.info.codec) in FAST_PATHS
    assert str(mp4.plan).startswith("packets: ")
    assert choose_plan(probe_video(mp4.path)).decord_ok  # probed rotation: decord may serve it
    for name, why in [("mov_h264_open_gop", "open-GOP"), ("mp4_h264_portrait_phone", "rotation"),
                      ("mp4_h264_10bit", "yuv420p10le"), ("mp4_h264_cut", "damaged")]:
        if name in corpus:
            assert why in decord_refusal(probe_video(corpus[name])), name
    if "Megamind.avi" in corpus:
        assert open_video(corpus["Megamind.avi"]).plan.kind == "sequential"


def test_header_that_promises_more_is_corrected(corpus):
    """An N-VOP at the end (Xvid, HMDB51): header and packets say 41, 40 frames decode; len says 40."""
    if "avi_mpeg4_nvop_tail" not in corpus:
        pytest.skip("mpeg4 encoder missing")
    for isolation in ("auto", "inline", "process"):
        reader = open_video(corpus["avi_mpeg4_nvop_tail"], isolation=isolation)
        assert reader.info.reported_frames == 41 and len(reader) == 40
        assert reader.plan.kind == "sequential"
        assert reader.isolation_used == ("process" if isolation == "process" else "inline")  # counted: no wait
        with pytest.raises(ValueError, match=r"valid indices are 0\.\.39 \(40 decodable frames, the container claims 41\)"):
            reader.get_frames([40])
    over = open_video(corpus["avi_mpeg4_header_over"])
    under = open_video(corpus["avi_mpeg4_header_under"])
    assert (over.info.reported_frames, len(over)) == (45, 40)
    assert (under.info.reported_frames, len(under)) == (35, 40)


def test_mpeg4_frames_are_counted_from_the_bitstream(corpus):
    """Coded VOPs = frames that decode: a lone N-VOP counts 0, packed P+B packets 2, their placeholders 0."""
    from video.mpeg4 import coded_vops, time_increment_bits
    from video_corpus import nvop_packet

    assert coded_vops(nvop_packet(5), 5) == 0
    for name in ("avi_mpeg4_nvop_tail", "Megamind.avi"):
        if name not in corpus:
            continue
        PROBE_CACHE.clear()
        reader = open_video(corpus[name])
        assert reader.info.counted and len(reader) == decoded_count(corpus[name])
        assert reader._decoder is None or reader._decoder.passes == 0  # counted at open without decoding
        if reader._decoder is not None:  # in process: the first request decodes the probe's packets
            indices = [0, len(reader) // 2, len(reader) - 1]
            assert np.array_equal(reader.get_frames_numpy(indices), reference_frames(corpus[name], indices))
            assert reader._decoder.passes == 1
    if "Megamind.avi" in corpus:
        import av

        with av.open(str(corpus["Megamind.avi"])) as container:
            stream = container.streams.video[0]
            bits = time_increment_bits(bytes(stream.codec_context.extradata))
            per_packet = [coded_vops(bytes(p), bits) for p in container.demux(stream) if p.size]
        assert set(per_packet) == {0, 1, 2} and sum(per_packet) == 270  # packed B-frames and their N-VOPs


def test_a_pass_that_ends_early_conceals_the_frames_past_its_end(corpus):
    """Safety net: should the count promise more than a pass decodes, the missing end is concealed and reported."""
    import dataclasses

    from video.sequential import SequentialDecoder

    if "avi_mpeg4" not in corpus:
        pytest.skip("mpeg4 encoder missing")
    info = open_video(corpus["avi_mpeg4"]).info
    longer = dataclasses.replace(info, num_frames=41, frame_pts=info.frame_pts + (info.frame_pts[-1] + 1,),
                                 _pts_index=None)
    decoder = SequentialDecoder(info.path, longer)
    frames = decoder.decode([0, 10, 20, 39, 40])
    assert decoder.last_concealed == [40] and np.array_equal(frames[4], frames[3])
    assert np.array_equal(frames[:4], reference_frames(info.path, [0, 10, 20, 39]))


def test_every_fast_path_is_in_the_corpus(corpus):
    """A (container, codec) pair may take the packets plan only if corpus clips of it are checked above."""
    covered = {(probe_video(path).container, probe_video(path).codec) for path in corpus.values()}
    unproven = FAST_PATHS - covered
    encoders = {"libdav1d": "libsvtav1", "hevc": "libx265", "h264": "libx264", "vp9": "libvpx-vp9", "vp8": "libvpx"}
    from video_corpus import has_encoder

    missing = {pair for pair in unproven if has_encoder(encoders.get(pair[1], pair[1]))}
    assert not missing, f"fast paths without a corpus clip: {sorted(missing)}"


def test_packed_bframes_decode_to_the_unpacked_frames_and_only_in_order(corpus):
    """The packed copy decodes to the very frames of its source; placing frames by timestamp (the packets
    plan, decord) would swap neighbours, which is why MPEG-4 in AVI takes the sequential plan."""
    from video.backends import decode_pyav
    from video.packets import PacketDecoder, PlanMismatch

    if "avi_mpeg4_packed_bframes" not in corpus:
        pytest.skip("mpeg4 encoder missing")
    packed, source = corpus["avi_mpeg4_packed_bframes"], corpus["avi_mpeg4_bframes"]
    every = list(range(40))
    truth = reference_frames(source, every)
    assert np.array_equal(reference_frames(packed, every), truth)
    reader = open_video(packed)
    assert reader.plan.kind == "sequential" and len(reader) == 40
    assert np.array_equal(reader.get_frames_numpy(every), truth)
    try:  # the seek/timestamp decoder (exact where the packets plan is): wrong frames, or frames it cannot place
        wrong = not np.array_equal(decode_pyav(probe_video(packed), every), truth)
    except VideoDecodeError:
        wrong = True
    assert wrong
    with pytest.raises(PlanMismatch):  # the packets plan's safety net sees the shuffled timestamps
        PacketDecoder(str(packed)).decode(every)
