"""Synthetic benchmark data: determinism, formats, held-out composition, motion clips."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from ernie_vl.data import synthetic as syn


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _objects(caption):
    """(colour, shape) pairs named in a caption."""
    pattern = r"(?:small|large) (\w+) (\w+)"
    return re.findall(pattern, caption)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return syn.make_shapes(root, num_train=120, num_val=20, num_heldout=30, image_size=32, seed=3)


def test_shapes_csv_format_and_images(shapes):
    assert shapes.counts == {"train": 120, "val": 20, "heldout": 30}
    for split, path in shapes.csv.items():
        rows = _rows(path)
        assert list(rows[0]) == ["filepath", "caption"]
        img = Image.open(shapes.root / rows[0]["filepath"])
        assert img.size == (32, 32) and img.mode == "RGB"
        pixels = np.asarray(img)
        assert (pixels != np.array(syn.BACKGROUND)).any(axis=-1).sum() > 4  # an object was drawn


def test_heldout_uses_only_unseen_combinations(shapes):
    held = set(shapes.heldout_combos)
    assert len(held) == len(syn.COLORS)
    train_objs = {o for r in _rows(shapes.csv["train"]) for o in _objects(r["caption"])}
    assert train_objs and not (train_objs & held)
    # every colour and every shape is still seen in training
    assert {c for c, _ in train_objs} == set(syn.COLORS) and {s for _, s in train_objs} == set(syn.SHAPES)
    held_rows = _rows(shapes.csv["heldout"])
    for r in held_rows:
        assert set(_objects(r["caption"])) & held, r["caption"]
    captions = [r["caption"] for r in held_rows]
    assert len(set(captions)) == len(captions)
    assert not set(captions) & {r["caption"] for r in _rows(shapes.csv["train"])}


def test_shapes_deterministic(tmp_path, shapes):
    again = syn.make_shapes(tmp_path, num_train=120, num_val=20, num_heldout=30, image_size=32, seed=3)
    assert _rows(again.csv["heldout"]) == _rows(shapes.csv["heldout"])
    a = np.asarray(Image.open(tmp_path / "images/train/train_000007.png"))
    b = np.asarray(Image.open(shapes.root / "images/train/train_000007.png"))
    np.testing.assert_array_equal(a, b)
    other = syn.make_shapes(tmp_path / "o", num_train=10, num_val=0, num_heldout=0, image_size=32, seed=4)
    assert _rows(other.csv["train"]) != _rows(shapes.csv["train"])[:10]


def test_shapes_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        syn.make_shapes(tmp_path, image_size=8)
    with pytest.raises(ValueError, match="num_train"):
        syn.make_shapes(tmp_path, num_train=-1)


def test_motion_frames_encode_the_class():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    right = syn.motion_frames(rng(), "move_right", 8, 32).astype(float)
    # centre of mass of non-background pixels moves right, frame by frame
    mask = (np.abs(right - np.array(syn.BACKGROUND)).sum(-1) > 60)
    xs = [np.nonzero(m)[1].mean() for m in mask]
    assert all(b > a for a, b in zip(xs, xs[1:])), xs
    grow = syn.motion_frames(rng(), "grow", 8, 32).astype(float)
    area = (np.abs(grow - np.array(syn.BACKGROUND)).sum(-1) > 60).sum(axis=(1, 2))
    assert area[-1] > 1.5 * area[0]
    with pytest.raises(ValueError, match="unknown motion class"):
        syn.motion_frames(rng(), "jump", 8, 32)


def test_motion_clips_written_as_h264(tmp_path):
    import av

    splits = syn.make_motion(tmp_path, num_train_per_class=2, num_val_per_class=1, num_frames=6, size=32, seed=1,
                             classes=("move_left", "rotate_clockwise"))
    assert splits.counts == {"train": 4, "val": 2}
    files = sorted((tmp_path / "train").glob("*/*.mp4"))
    assert [f.parent.name for f in files] == ["move_left", "move_left", "rotate_clockwise", "rotate_clockwise"]
    with av.open(str(files[0])) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (32, 32, 3)
    expected = syn.motion_frames(np.random.default_rng([1, 0, 0, 0]), "move_left", 6, 32)
    assert np.abs(np.stack(frames).astype(int) - expected.astype(int)).mean() < 6  # lossy but faithful
    prompts = json.loads((tmp_path / "train" / "prompts.json").read_text())
    assert set(prompts) == {"move_left", "rotate_clockwise"}
    assert syn.load_prompts(tmp_path / "val") == prompts
    assert syn.load_prompts(tmp_path) is None
