"""The threads="auto" policy: which decoder threading is chosen where, and that every choice returns the same frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import video.threads as vt
from _video_fixtures import write_clip
from video import open_video, probe_video
from video.backends import plan_decodes
from video.decode import PROBE_CACHE
from video.threads import ThreadChoice, check_threads, choose_threads


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    return {
        "long_gop": write_clip(root / "long_gop.mp4", num_frames=60, gop=300),  # no B-frames, 1 slice
        "sliced": write_clip(root / "sliced.mp4", num_frames=60, gop=300, slices=3),
        "short_gop": write_clip(root / "short_gop.mp4", num_frames=60, gop=6),
        "long_bframes": write_clip(root / "long_bframes.mp4", num_frames=60, gop=300, bframes=3),
    }


SPREAD = [3, 10, 18, 25, 33, 40, 48, 55]  # TSN-like: one frame in each eighth of 60


def test_probe_counts_slices(clips):
    assert probe_video(clips["sliced"]).slices == 3
    assert probe_video(clips["long_gop"]).slices == 1


def test_auto_policy_choices(clips):
    long = probe_video(clips["long_gop"])
    idle2 = dict(in_worker=False, cores=2, busy=0)  # an idle 2-core machine, main process
    assert choose_threads(long, SPREAD, **idle2) == ThreadChoice(
        3, "frame", "long runs (56 packets in 1 runs), 2 of 2 cores spare, 1 slice per frame")
    assert choose_threads(long, SPREAD, in_worker=False, cores=16, busy=0).count == vt.MAX_THREADS
    assert choose_threads(long, SPREAD, in_worker=False, cores=4, busy=2).count == 3  # 2 spare cores + 1
    worker = choose_threads(long, SPREAD, in_worker=True, cores=16, busy=0)
    assert (worker.count, worker.kind) == (1, "none") and "DataLoader worker" in worker.reason
    assert choose_threads(long, SPREAD, in_worker=False, cores=1, busy=0) == ThreadChoice(1, "none", "one usable core")
    busy = choose_threads(long, SPREAD, in_worker=False, cores=2, busy=1)  # one core taken by another job
    assert (busy.count, busy.kind) == (1, "none") and "fewer than 2 spare" in busy.reason
    few = choose_threads(long, [0, 5, 9], **idle2)  # 10 packets: not worth a pipeline
    assert (few.count, few.kind, few.reason) == (1, "none", "short runs (10 packets in 1 runs)")

    sliced = probe_video(clips["sliced"])
    choice = choose_threads(sliced, SPREAD, **idle2)
    assert (choice.count, choice.kind) == (2, "slice") and choice.reason.endswith("3 slices per frame")
    assert choose_threads(sliced, SPREAD, in_worker=False, cores=16, busy=0).count == 3  # no more threads than slices

    short = probe_video(clips["short_gop"])  # a restart at the key frame before each wanted frame
    packets, seeks = plan_decodes(short, SPREAD, 2.0, skip_droppable=True)
    choice = choose_threads(short, SPREAD, **idle2)
    assert (choice.count, choice.kind) == (1, "none") and seeks == 7
    assert choice.reason == f"short runs ({packets} packets in {seeks + 1} runs)"

    bframes = probe_video(clips["long_bframes"])  # unwanted B-frames are skipped, so fewer packets
    skipped = len([i for i in bframes.droppable if i < 55 and i not in SPREAD])
    choice = choose_threads(bframes, SPREAD, **idle2)
    assert f"({56 - skipped} packets in 1 runs)" in choice.reason
    assert choice.kind == ("frame" if 56 - skipped >= vt.MIN_PACKETS else "none")


def test_running_threads_are_read_from_proc():
    busy = vt.others_running()
    assert isinstance(busy, int) and busy >= 0


def test_busy_threads_are_the_least_of_several_reads(monkeypatch):
    """A thread that shows up in one read only (finishing) is not counted; the caller never is."""
    reads = iter([5, 2, 7, 3])
    monkeypatch.setattr(vt, "_running_now", lambda: next(reads))
    assert vt.others_running(samples=4, interval_s=0.0) == 1
    monkeypatch.setattr(vt, "_running_now", lambda: None)
    assert vt.others_running() == 0


def test_threads_argument_is_checked(clips):
    assert check_threads("auto") == "auto" and check_threads(3) == 3
    with pytest.raises(ValueError, match="threads must be \"auto\" or an int >= 1, got 'two'"):
        open_video(clips["long_gop"], threads="two")
    with pytest.raises(ValueError, match="got 0"):
        open_video(clips["long_gop"], threads=0)
    with pytest.raises(TypeError, match=r"got 2.0 \(float\)"):
        open_video(clips["long_gop"], threads=2.0)
    with pytest.raises(TypeError, match=r"got True \(bool\)"):
        open_video(clips["long_gop"], threads=True)


@pytest.mark.parametrize("threads, expected", [(1, (1, "none", "NONE")), (3, (3, "frame", "FRAME"))])
def test_explicit_threads_are_honoured(clips, threads, expected):
    reader = open_video(clips["sliced"], threads=threads)
    assert reader.thread_choice is None  # chosen at the first request
    reader.get_frames([0, 59])
    ctx = reader._decoder._ctx
    assert (reader.thread_choice.count, reader.thread_choice.kind, ctx.thread_type.name) == expected
    assert ctx.thread_count == threads


@pytest.mark.parametrize("name, kind", [("long_gop", "frame"), ("sliced", "slice"), ("short_gop", "none")])
def test_auto_threads_return_the_frames_of_one_thread(clips, name, kind, monkeypatch):
    monkeypatch.setattr(vt, "usable_cores", lambda: 2)
    monkeypatch.setattr(vt, "others_running", lambda: 0)  # as on an idle machine
    requests = [SPREAD, [59, 2, 30, 30], [31, 45], [0]]  # forward, backward with repeats, continue, restart
    PROBE_CACHE.clear()
    auto = open_video(clips[name])
    one = open_video(clips[name], threads=1)
    for indices in requests:
        assert np.array_equal(auto.get_frames_numpy(indices), one.get_frames_numpy(indices)), indices
    assert auto.thread_choice.kind == kind  # the first request's choice stays with the reader
    assert auto._decoder._ctx.thread_type.name == {"frame": "FRAME", "slice": "SLICE", "none": "NONE"}[kind]
    assert one.thread_choice == ThreadChoice(1, "none", "threads=1 given")


class _ChoiceDataset(Dataset):
    """Reads the spread frames of one clip and returns the decoder threading the reader chose."""

    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, i):
        reader = open_video(self.path)
        frames = reader.get_frames(SPREAD)
        return frames.sum(), reader.thread_choice.count, reader.thread_choice.kind


def test_dataloader_workers_decode_on_one_thread(clips, monkeypatch):
    monkeypatch.setattr(vt, "usable_cores", lambda: 2)  # inherited by the forked worker
    monkeypatch.setattr(vt, "others_running", lambda: 0)
    ds = _ChoiceDataset(clips["long_gop"])
    assert not vt.in_dataloader_worker()
    total, count, kind = ds[0]
    assert (count, kind) == (3, "frame")  # main process, long run, 2 cores
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    (w_total, w_count, w_kind), = list(loader)
    assert (w_count, w_kind) == (1, "none") and torch.equal(w_total, total)
