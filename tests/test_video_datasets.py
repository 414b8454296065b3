"""VideoFolder / VideoCSV: clips, labels, failures counted across DataLoader workers."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from _video_fixtures import coded_index, reference_frames, truncated_copy, write_clip
from video import VideoCSV, VideoFolder, collate_skip_none
from video.transforms import build_clip_transform


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    (root / "jump").mkdir()
    (root / "run").mkdir()
    write_clip(root / "jump" / "a.mp4", num_frames=32, gop=8)
    write_clip(root / "jump" / "b.mp4", num_frames=24, gop=8)
    write_clip(root / "run" / "c.mp4", num_frames=32, gop=8)
    truncated_copy(root / "run" / "c.mp4", root / "run" / "cut.mp4", 0.02)
    (root / "run" / "notes.txt").write_text("not a video")
    (root / "run" / "fake.mp4").write_text("not a video either")
    return root


def identity_transform(size: int = 16):
    return build_clip_transform(train=False, image_size=size, mean=(0, 0, 0), std=(1, 1, 1))


def test_folder_items_are_the_sampled_frames(folder):
    ds = VideoFolder(folder, num_frames=4, sampling="uniform", transform=identity_transform())
    assert ds.classes == ["jump", "run"]
    assert [p.split("/")[-1] for p, _ in ds.samples] == ["a.mp4", "b.mp4", "c.mp4", "cut.mp4", "fake.mp4"]
    clip, label = ds[0]
    assert clip.shape == (4, 3, 16, 16) and clip.dtype == torch.float32 and label == 0
    # uniform over 32 frames: 0, 10, 21, 31; the red level of frame i is 8 * i / 255
    assert coded_index(clip[:3, 0].mean(dim=(1, 2)) * 255) == [0, 10, 21]  # frame 31's code (248) is ambiguous
    # exact: the clip is the transform of frames 0, 10, 21, 31 of PyAV's sequential decode
    expect = identity_transform()(torch.from_numpy(reference_frames(ds.samples[0][0], [0, 10, 21, 31])))
    assert torch.equal(clip, expect)
    assert ds[2][1] == 1


def test_failures_are_skipped_counted_and_listed_across_workers(folder):
    ds = VideoFolder(folder, num_frames=4, sampling="tsn", train=True, transform=build_clip_transform(True, 16))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    labels = []
    for batch in loader:
        if batch is not None:
            clips, y = batch
            assert clips.shape[1:] == (4, 3, 16, 16)
            labels += y.tolist()
    assert sorted(labels) == [0, 0, 1]
    failed = sorted(f.path.split("/")[-1] for f in ds.failures)
    assert failed == ["cut.mp4", "fake.mp4"]
    report = ds.failure_report()
    assert report["count"] == 2 and all(f["reason"] for f in report["files"])


def test_collate_skip_none():
    a = (torch.ones(2, 3, 4, 4), 1)
    out = collate_skip_none([None, a, None, a])
    assert out[0].shape == (2, 2, 3, 4, 4) and out[1].tolist() == [1, 1]
    assert collate_skip_none([None, None]) is None


def test_csv_with_names_and_with_indices(folder, tmp_path):
    csv_names = folder / "list.csv"
    csv_names.write_text("path,label\njump/a.mp4,jump\nrun/c.mp4,run\njump/b.mp4,jump\n")
    ds = VideoCSV(csv_names, num_frames=2, sampling="uniform", transform=identity_transform(8))
    assert ds.classes == ["jump", "run"] and [y for _, y in ds.samples] == [0, 1, 0]
    assert ds[1][0].shape == (2, 3, 8, 8)
    csv_ids = folder / "ids.csv"
    csv_ids.write_text("file,cls\njump/a.mp4,2\nrun/c.mp4,0\n")
    ds2 = VideoCSV(csv_ids, num_frames=2, path_col="file", label_col="cls", transform=identity_transform(8))
    assert ds2.classes == ["0", "1", "2"] and [y for _, y in ds2.samples] == [2, 0]
    ds.save_class_index(tmp_path / "classes.json")
    assert json.loads((tmp_path / "classes.json").read_text()) == {"jump": 0, "run": 1}


def test_bad_dataset_arguments(folder, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolder(tmp_path / "nope", num_frames=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        VideoFolder(tmp_path / "empty", num_frames=4)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.mp4,swim\n")
    with pytest.raises(ValueError, match="label 'swim'"):
        VideoCSV(bad, num_frames=4, classes=["jump", "run"])
    with pytest.raises(ValueError, match="no column 'label '"):
        VideoCSV(bad, num_frames=4, label_col="label ", path_col="path")
    with pytest.raises(ValueError, match="sampling 'random'"):
        VideoFolder(folder, num_frames=4, sampling="random")
