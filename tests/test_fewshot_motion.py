"""The few-shot bench's clips through the real augmentation path: does a flipped or reversed clip show
the motion of the label it is given?

The clips come from ``bench/_motion_clips.py`` (the generator the few-shot goal is measured on); they
go through ``MixedSource`` + ``ClipAugmenter`` with the bench's own ``augment.json`` maps, exactly as
the trainer feeds them, and a motion probe measures what the pixels show: the moving object's
centroid trajectory (dx, dy in pixels per frame) and its rotation rate (brightness constancy under a
rigid rotation, + = clockwise on screen).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

from _motion_clips import AUGMENT, CLASSES, clip_frames  # noqa: E402

from ernie_vl.data.clip_augment import ClipAugmentConfig, ClipAugmenter  # noqa: E402
from ernie_vl.data.mixing import MixedSource, StepMix  # noqa: E402
from ernie_vl.data.sources import Normaliser  # noqa: E402
from video.clip_mixing import temporal_indices  # noqa: E402
from video.label_maps import LabelMaps  # noqa: E402

PER_CLASS = 3


def motion(frames: np.ndarray) -> dict[str, float]:
    """(T,H,W,3) uint8 -> {"dx", "dy": centroid velocity of what moves (px/frame), "spin": rad/frame, + clockwise}."""
    x = frames.astype(np.float64)
    grey = x.mean(-1)
    t_len, h, w = grey.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    moving = np.abs(x - np.median(x, 0)).sum(-1)  # differs from the clip's temporal median: the object
    mass = moving.sum((1, 2)) + 1e-9
    cx, cy = (moving * xs).sum((1, 2)) / mass, (moving * ys).sum((1, 2)) / mass
    t = np.arange(t_len) - (t_len - 1) / 2

    def slope(v: np.ndarray) -> float:
        return float((t * (v - v.mean())).sum() / (t * t).sum())

    gy, gx = np.gradient(grey, axis=(1, 2))
    gx, gy = (gx[1:] + gx[:-1]) / 2, (gy[1:] + gy[:-1]) / 2
    g = gx * -(ys - cy.mean()) + gy * (xs - cx.mean())  # image change per unit of clockwise rotation
    mask = (moving[1:] + moving[:-1]) > 30
    dt = np.diff(grey, axis=0) * mask
    spin = float(-(dt * g * mask).sum() / max(((g * mask) ** 2).sum(), 1e-9))
    return {"dx": slope(cx), "dy": slope(cy), "spin": spin}


def shows(frames: np.ndarray, label: str) -> bool:
    """Whether the pixels show the direction ``label`` names, among the classes of its kind (a move, a
    rotation: flips and reversals never change the kind). Size changes are checked pixel for pixel
    elsewhere (the probe does not read them)."""
    m = motion(frames)
    if label.startswith("move"):
        axis, sign = {"move_left": ("dx", -1), "move_right": ("dx", 1), "move_up": ("dy", -1),
                      "move_down": ("dy", 1)}[label]
        other = "dy" if axis == "dx" else "dx"
        return sign * m[axis] > 0.5 and abs(m[other]) < 0.3
    if label.startswith("rotate"):
        return (1 if label == "rotate_cw" else -1) * m["spin"] > 0.0
    raise ValueError(f"the probe reads moves and rotations, not {label!r}")


def _kind(label: str) -> str:
    return label.split("_")[0] if label.startswith(("move", "rotate")) else "size"


def _clips(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    frames, labels = [], []
    for c, action in enumerate(CLASSES):
        for i in range(PER_CLASS):
            frames.append(clip_frames(np.random.default_rng([seed, c, i]), action))
            labels.append(c)
    return np.stack(frames), np.asarray(labels)


@pytest.fixture(scope="module")
def bench_clips():
    return _clips()


def test_the_probe_reads_every_class_of_the_generator(bench_clips):
    frames, labels = bench_clips
    for clip, label in zip(frames, labels):
        name = CLASSES[label]
        if _kind(name) == "size":
            continue
        assert shows(clip, name), (name, motion(clip))
        for other in CLASSES:  # and no other direction of its kind
            if other != name and _kind(other) == _kind(name):
                assert not shows(clip, other), (name, other, motion(clip))


def test_the_bench_maps_name_the_motion_a_flip_or_a_reversal_shows(bench_clips):
    """Each class's partner under ``hflip`` / ``reverse`` in the bench's augment.json is what the
    transformed pixels show; a class left out of a map keeps its motion under that transform."""
    frames, labels = bench_clips
    for kind, op in (("hflip", lambda f: f[:, :, ::-1]), ("reverse", lambda f: f[::-1])):
        partner = {a: b for a, b in AUGMENT[kind].items()} | {b: a for a, b in AUGMENT[kind].items()}
        for clip, label in zip(frames, labels):
            name = CLASSES[label]
            if _kind(name) != "size":
                assert shows(np.ascontiguousarray(op(clip)), partner.get(name, name)), (kind, name)
    # unmapped under the flip, as a mirror must leave them: vertical moves, size changes
    assert set(CLASSES) - set(AUGMENT["hflip"]) - set(AUGMENT["hflip"].values()) == \
        {"move_up", "move_down", "grow", "shrink"}


def test_a_reversed_clip_is_its_partners_clip_pixel_for_pixel():
    """The generator is symmetric in time: the reversed clip of a class is exactly the partner's clip
    drawn from the same random state (grow <-> shrink included, which the probe does not read)."""
    for a, b in AUGMENT["reverse"].items():
        for i in range(2):
            ours = clip_frames(np.random.default_rng([9, i]), a)
            theirs = clip_frames(np.random.default_rng([9, i]), b)
            assert np.array_equal(ours[::-1], theirs), (a, b)


class _BenchVideos:
    """The generator's clips held like ``CachedVideos``: uint8 (N,T,3,H,W), labels, prompt tokens."""

    def __init__(self, frames: np.ndarray, labels: np.ndarray) -> None:
        self.classes = list(CLASSES)
        self.norm = Normaliser((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.clips = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).contiguous()
        self.labels = torch.from_numpy(labels).long()
        self.prompt_tokens = [torch.full((1, 3), c + 1) for c in range(len(CLASSES))]

    def __len__(self) -> int:
        return len(self.labels)


class _Ids:
    def __init__(self, n: int, seed: int = 0) -> None:
        self.g, self.n = torch.Generator().manual_seed(seed), n

    def sample_global(self, k: int) -> torch.Tensor:
        return torch.randint(self.n, (k,), generator=self.g)


def _to_frames(clip: torch.Tensor, norm: Normaliser) -> np.ndarray:
    """A float clip (T,3,H,W) of the step source back to uint8 (T,H,W,3)."""
    mean, std = torch.tensor(norm.mean).view(3, 1, 1), torch.tensor(norm.std).view(3, 1, 1)
    return ((clip * std + mean) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _source(videos: _BenchVideos, num_frames: int, **aug) -> MixedSource:
    cfg = ClipAugmentConfig(maps=LabelMaps.from_dict(AUGMENT), **aug)
    augmenter = ClipAugmenter(cfg, videos.classes, num_frames=num_frames, seed=1)
    return MixedSource(StepMix(0, 16), 0, None, videos, None, _Ids(len(videos)), video_text=True,
                       augmenter=augmenter)


def test_the_training_path_labels_every_clip_with_the_motion_it_shows(bench_clips):
    """Flips, reversals and TSN temporal + frame-rate jitter as the trainer applies them (the bench's
    augment.json, the recipe's jitter): every clip's new label is the motion its pixels show, and its
    prompt follows the label."""
    videos = _BenchVideos(*bench_clips)
    source = _source(videos, num_frames=8, temporal_jitter=True, speed_min=0.8)
    changed = 0
    for _ in range(12):
        drawn = source.next()
        batch = drawn.batch
        for clip, label, text, vid in zip(batch.videos, batch.video_labels, batch.video_texts, drawn.video_ids):
            name = CLASSES[int(label)]
            if _kind(name) != "size":
                assert shows(_to_frames(clip, videos.norm), name), (CLASSES[int(videos.labels[vid])], name)
            assert int(text[0]) == int(label) + 1
            changed += int(label) != int(videos.labels[vid])
    assert changed > 30  # the maps were used, not skipped


def test_a_relabelled_size_change_is_played_backwards_and_a_kept_one_forwards(bench_clips):
    """grow / shrink through the training path without jitter: a clip whose label changed is its stored
    clip reversed (and maybe mirrored: a mirror keeps a size change), one whose label stayed runs forwards."""
    videos = _BenchVideos(*bench_clips)
    source = _source(videos, num_frames=16)
    seen = {True: 0, False: 0}
    for _ in range(12):
        drawn = source.next()
        for clip, label, vid in zip(drawn.batch.videos, drawn.batch.video_labels, drawn.video_ids):
            if _kind(CLASSES[int(label)]) != "size":
                continue
            stored = torch.from_numpy(_to_frames(videos.norm.to_float(videos.clips[vid]), videos.norm))
            got = torch.from_numpy(_to_frames(clip, videos.norm))
            reversed_ = int(label) != int(videos.labels[vid])
            want = stored.flip(0) if reversed_ else stored
            assert torch.equal(got, want) or torch.equal(got, want.flip(2))
            seen[reversed_] += 1
    assert min(seen.values()) > 5


def test_temporal_and_frame_rate_jitter_keep_the_frames_in_order():
    g = torch.Generator().manual_seed(0)
    for jitter in (False, True):
        idx = temporal_indices(16, 8, 500, g, jitter=jitter, speed=(0.8, 1.0))
        assert (idx.diff(dim=1) > 0).all()  # strictly forward in time: never a repeated or swapped frame
        assert idx.min() >= 0 and idx.max() <= 15
        span = idx[:, -1] - idx[:, 0]
        assert span.min() >= 8 and span.max() <= 15  # at least 80% of the clip is covered


@pytest.mark.parametrize("mix", [dict(mixup=1.0), dict(cutmix=1.0)])
def test_mixed_clips_carry_the_relabelled_classes_in_their_soft_targets(bench_clips, mix):
    """With every transform forced on (p = 1), each clip's label after flip then reversal is known; the
    soft target of mixed clip i is lam * its class + (1 - lam) * the class of clip B-1-i, both after
    relabelling, and the pixels are mixed by the same lam."""
    videos = _BenchVideos(*bench_clips)
    flip = {a: b for a, b in AUGMENT["hflip"].items()} | {b: a for a, b in AUGMENT["hflip"].items()}
    rev = {a: b for a, b in AUGMENT["reverse"].items()} | {b: a for a, b in AUGMENT["reverse"].items()}
    after = torch.tensor([CLASSES.index(rev.get(flip.get(c, c), flip.get(c, c))) for c in CLASSES])
    assert CLASSES[int(after[CLASSES.index("move_left")])] == "move_left"  # mirrored and reversed: same way
    assert CLASSES[int(after[CLASSES.index("rotate_cw")])] == "rotate_cw"
    assert CLASSES[int(after[CLASSES.index("move_up")])] == "move_down"
    source = _source(videos, num_frames=16, p_hflip=1.0, p_reverse=1.0, **mix)
    plain = _source(videos, num_frames=16, p_hflip=1.0, p_reverse=1.0)  # the same draws without mixing
    for _ in range(4):
        drawn, ref = source.next(), plain.next()
        assert torch.equal(drawn.video_ids, ref.video_ids)
        labels = after[videos.labels[drawn.video_ids]]
        assert torch.equal(ref.batch.video_labels, labels)
        soft = drawn.batch.video_labels
        lam = soft[torch.arange(16), labels]
        partner = labels.flip(0)
        same = labels == partner
        lam = torch.where(same, torch.ones_like(lam), lam)
        expected = torch.zeros_like(soft)
        expected[torch.arange(16), labels] += torch.where(same, torch.ones_like(lam), lam)
        expected[torch.arange(16), partner] += torch.where(same, torch.zeros_like(lam), 1 - lam)
        torch.testing.assert_close(soft, expected)
        x, xp = ref.batch.videos, ref.batch.videos.flip(0)
        if "mixup" in mix:
            k = int((~same).nonzero()[0])
            torch.testing.assert_close(drawn.batch.videos[k], lam[k] * x[k] + (1 - lam[k]) * xp[k], atol=1e-5,
                                       rtol=1e-5)
        else:  # every pixel is the clip's own or its partner's, and the partner's share is 1 - lam
            own = (drawn.batch.videos - x).abs().amax((1, 2)) < 1e-6
            theirs = (drawn.batch.videos - xp).abs().amax((1, 2)) < 1e-6
            assert (own | theirs).all()
            differ = ~same & ((x - xp).abs().amax((1, 2)) > 1e-6).all(dim=(1, 2))
            share = (theirs & ~own).float().mean((1, 2))
            torch.testing.assert_close(share[differ], (1 - lam)[differ], atol=0.02, rtol=0)


def test_bench_verdicts_need_both_seeds_and_only_report_the_references():
    import few_shot_video as bench

    def row(variant, seed, top1, clips=40):
        return {"clips": clips, "variant": variant, "seed": seed, "top1": top1, "steps": 100}

    rows = [row("full", 0, 0.95), row("c3d", 0, 0.97), row("noaug", 1, 0.99)]
    v = {x.what: x for x in bench.verdicts(rows)}
    assert v["supervised top-1, 40 clips/class, two seeds"].met is False  # one seed only
    assert "(one seed only)" in v["supervised top-1, 40 clips/class, two seeds"].measured
    ref = v["reference 3D convnet (~70k parameters), top-1, 40 clips/class"]
    assert ref.met is None and ref.measured == "seed 0: 0.970 (100 steps)"
    both = {x.what: x.met for x in bench.verdicts(rows + [row("full", 1, 0.91)])}
    assert both["supervised top-1, 40 clips/class, two seeds"] is True
    low = {x.what: x.met for x in bench.verdicts(rows + [row("full", 1, 0.89)])}
    assert low["supervised top-1, 40 clips/class, two seeds"] is False
    assert bench.parse_rows("40:c3d:0,512:full:1") == [(40, "c3d", 0), (512, "full", 1)]
    with pytest.raises(ValueError, match="CLIPS:VARIANT:SEED"):
        bench.parse_rows("40:fancy:0")


def test_bench_variants_name_the_encoder_they_mean_whatever_tiny_defaults_to():
    import few_shot_video as bench

    enc = bench.expected_encoder
    full = enc("full")
    assert enc("noaug") == full  # the ablations are relative to tiny's defaults
    assert enc("space_only") == dict(full, attention="space_only", tubelet_size=1)
    assert enc("nostem") == enc("nostem_noaug") == dict(full, conv_stem=0)
    assert enc("space_only_nostem") == dict(full, attention="space_only", tubelet_size=1, conv_stem=0)
    assert enc("tokenizer")["conv_stem"] == {"channels": [16, 32, 64], "frame_diff": False, "time_kernel": 3}
    assert enc("tokenizer_diff")["conv_stem"] == {"channels": [16, 32, 64], "frame_diff": True, "time_kernel": 3}
    assert enc("stem")["conv_stem"] == 24 and enc("vit_ref")["conv_stem"] == 0 and enc("c3d") is None
    if isinstance(full["conv_stem"], dict):  # a tokenizer default: the static row keeps its channels, not its time
        assert enc("space_only_static") == dict(full, attention="space_only", tubelet_size=1, conv_stem={
            "channels": full["conv_stem"]["channels"], "frame_diff": False, "time_kernel": 1})
    assert set(bench.LEGEND) == set(bench.VARIANTS)
    assert bench.describe_encoder(enc("tokenizer_diff")) == \
        "divided, k=4, p=8, tokenizer [16, 32, 64] + diff, cls shared"
    assert bench.describe_encoder({"attention": "space_only", "tubelet_size": 1, "conv_stem": {
        "channels": [16], "frame_diff": False, "time_kernel": 1}}) == "space_only, k=1, tokenizer [16], time kernel 1"
    assert bench.describe_encoder(enc("vit_ref")) == "divided, k=4, p=8, no stem, cls shared"
    assert bench.describe_encoder({"attention": "divided", "tubelet_size": 4, "conv_stem": 0}) == "divided, k=4, no stem"
    assert bench.describe_encoder(None) == "-"


def test_bench_rows_that_ran_another_encoder_are_stale_and_left_out_of_the_verdicts():
    from types import SimpleNamespace

    import few_shot_video as bench

    def row(seed, top1, **extra):
        return {"clips": 40, "variant": "full", "seed": seed, "top1": top1, "zeroshot_top1": None, "steps": 100,
                "train_s": 1.0, "budget": {"minutes": None, "steps": 100}, "load": [1.0, 1.0], "setup": {},
                "written": "2026-01-01 00:00 UTC", **extra}

    now = bench.expected_encoder("full")
    other = dict(now, tubelet_size=2)
    current = [row(0, 0.95, video_encoder=now), row(1, 0.93, video_encoder=now)]
    assert not any(bench.is_stale(r) for r in current) and bench.is_stale(row(1, 0.93, video_encoder=other))
    goal = "supervised top-1, 40 clips/class, two seeds"
    assert {v.what: v.met for v in bench.verdicts(current)}[goal] is True
    mixed = {v.what: v for v in bench.verdicts([current[0], row(1, 0.99, video_encoder=other)])}
    assert mixed[goal].met is False and "(one seed only)" in mixed[goal].measured
    renamed = dict(row(0, 0.5, video_encoder=dict(now, conv_stem=0)), variant="nostem", relabelled_from="full",
                   note="run when tiny had no stem")
    assert bench.relabel_notes([renamed, current[0]]) == [
        "- `40:nostem:0` (written 2026-01-01 00:00 UTC) ran as `full`: run when tiny had no stem"]
    text = bench.markdown([renamed, *current, row(1, 0.99, video_encoder=other)], "cmd",
                          SimpleNamespace(line=lambda: "machine"))
    assert "| 40 | full (stale: ran another encoder) |" in text and "ran as `full`: run when tiny had no stem" in text
    assert f"| 40 | full | {bench.describe_encoder(now)} | 0 | 100 |" in text


def test_a_bench_row_records_the_video_encoder_it_trained(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import few_shot_video as bench
    from _motion_clips import make_clips

    monkeypatch.setattr(bench, "make_clips", lambda root, n: make_clips(root, n, val_per_class=1))
    args = SimpleNamespace(work=str(tmp_path), minutes=None, steps=2, batch_videos=4, threads=1, no_progress=True)
    row = bench.run_row(2, "space_only_nostem", 0, args)
    assert row["steps"] == 2 and row["setup"]["videos"]["clips_per_class"] == 2
    assert row["video_encoder"] == {"attention": "space_only", "tubelet_size": 1, "conv_stem": 0, "patch_size": [8, 8],
                                    "cls_mode": "shared"}
    assert not bench.is_stale(row) and bench.is_stale(dict(row, variant="stem"))
