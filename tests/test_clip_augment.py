"""Label-aware flips / reversals, temporal and frame-rate jitter, mixup / cutmix, and their use in training."""
from __future__ import annotations

import json

import pytest
import torch

from ernie_vl.data.clip_augment import ClipAugmentConfig, ClipAugmenter, declared_maps
from ernie_vl.data.mixing import MixedSource, StepMix
from ernie_vl.data.sources import Normaliser
from ernie_vl.losses import classification_loss
from video.clip_mixing import crop_resize, mix_clips, one_hot, random_crop_boxes, temporal_indices
from video.label_maps import LabelMaps, apply_plan, load_label_maps, parse_map

CLASSES = ["move_left", "move_right", "grow", "shrink", "rotate_cw", "rotate_acw", "fall", "wave"]
DECLARED = {"hflip": {"move_left": "move_right", "rotate_cw": "rotate_acw"},
            "reverse": {"grow": "shrink", "rotate_cw": "rotate_acw"},
            "no_hflip": ["fall"], "no_reverse": ["fall", "move_left", "move_right"]}


def _maps(data=DECLARED, p=0.5):
    return LabelMaps.from_dict(data).resolve(CLASSES, p, p)


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("data, message", [
    ({"hflip": {"move_left": "move_rigth"}}, "unknown class(es) ['move_rigth']"),
    ({"reverse": {"grow": "shrink", "shrink": "fall"}}, "sends class 'shrink' to two classes"),
    ({"hflip": {"move_left": "move_right", "grow": "move_right"}}, "sends class 'move_right' to two classes"),
    ({"hflip": {"move_left": "move_right"}, "no_hflip": ["move_left"]}, "also in no_hflip"),
    ({"no_reverse": ["jump"]}, "unknown class(es) ['jump']"),
])
def test_bad_maps_fail_naming_the_classes(data, message):
    with pytest.raises(ValueError) as err:
        LabelMaps.from_dict(data).resolve(CLASSES)
    assert message in str(err.value)
    if "unknown" in message:
        assert str(CLASSES) in str(err.value)  # the valid classes are listed


def test_bad_file_shapes_fail():
    with pytest.raises(ValueError, match="unknown key"):
        LabelMaps.from_dict({"flip": {}})
    with pytest.raises(ValueError, match="must map class names"):
        LabelMaps.from_dict({"hflip": ["move_left", "move_right"]})
    with pytest.raises(ValueError, match="list of class names"):
        LabelMaps.from_dict({"no_hflip": "fall"})


def test_parse_map_forms(tmp_path):
    assert parse_map("move_left:move_right, grow:shrink") == {"move_left": "move_right", "grow": "shrink"}
    assert parse_map('{"a": "b"}') == {"a": "b"}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"c": "d"}))
    assert parse_map(str(path)) == {"c": "d"}
    with pytest.raises(ValueError, match="CLASS:PARTNER"):
        parse_map("move_left-move_right")
    with pytest.raises(ValueError, match="two classes"):
        parse_map("a:b,a:c")


def test_augment_json_is_read_and_flags_replace_its_entries(tmp_path):
    (tmp_path / "augment.json").write_text(json.dumps(DECLARED))
    assert load_label_maps(tmp_path).hflip == DECLARED["hflip"]
    assert load_label_maps(tmp_path / "train.csv").reverse == DECLARED["reverse"]  # a CSV's folder
    merged = declared_maps([str(tmp_path)], LabelMaps(hflip={"grow": "grow"}))
    assert merged.hflip == {"grow": "grow"} and merged.reverse == DECLARED["reverse"]
    assert merged.no_hflip == ["fall"]
    (tmp_path / "empty").mkdir()
    assert declared_maps([str(tmp_path / "empty")]) is None
    (tmp_path / "augment.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_label_maps(tmp_path)


# --------------------------------------------------------------------------- plans


def test_without_a_declaration_nothing_is_flipped_or_reversed():
    maps = LabelMaps().resolve(CLASSES, 1.0, 1.0)
    flip, reverse, labels = maps.plan(torch.arange(8).repeat(50), torch.Generator().manual_seed(0))
    assert not flip.any() and not reverse.any() and torch.equal(labels, torch.arange(8).repeat(50))
    assert not maps.active and maps.summary() == {"hflip": "off", "reverse": "off"}


def test_plan_relabels_through_the_maps_and_never_touches_direction_sensitive_classes():
    maps = _maps()
    labels = torch.arange(len(CLASSES)).repeat(400)
    flip, reverse, new = maps.plan(labels, torch.Generator().manual_seed(1))
    idx = {c: i for i, c in enumerate(CLASSES)}
    # the declared never-lists hold
    assert not flip[labels == idx["fall"]].any()
    for name in ("fall", "move_left", "move_right"):
        assert not reverse[labels == idx[name]].any()
    # both transforms happen, near their probability, where allowed
    assert 0.4 < flip[labels == idx["grow"]].float().mean() < 0.6
    assert 0.4 < reverse[labels == idx["grow"]].float().mean() < 0.6
    # each outcome's label is exactly the composition of the maps
    hf = {"move_left": "move_right", "move_right": "move_left", "rotate_cw": "rotate_acw", "rotate_acw": "rotate_cw"}
    rv = {"grow": "shrink", "shrink": "grow", "rotate_cw": "rotate_acw", "rotate_acw": "rotate_cw"}
    for lab, f, r, n in zip(labels.tolist(), flip.tolist(), reverse.tolist(), new.tolist()):
        name = CLASSES[lab]
        if f:
            name = hf.get(name, name)
        if r:
            name = rv.get(name, name)
        assert CLASSES[n] == name
    # a transformed clip never carries the label of a class that may not be transformed that way
    assert not (flip & (new == idx["fall"])).any()
    assert not (reverse & torch.isin(new, torch.tensor([idx["fall"], idx["move_left"], idx["move_right"]]))).any()
    # rotations flipped AND reversed come back to their own class
    both = flip & reverse & (labels == idx["rotate_cw"])
    assert both.any() and (new[both] == idx["rotate_cw"]).all()


def test_apply_plan_flips_width_and_reverses_time_exactly():
    clips = torch.arange(3 * 4 * 3 * 2 * 5, dtype=torch.float32).reshape(3, 4, 3, 2, 5)
    out = apply_plan(clips, torch.tensor([True, False, True]), torch.tensor([False, True, True]))
    assert torch.equal(out[0], clips[0].flip(-1))
    assert torch.equal(out[1], clips[1].flip(0))
    assert torch.equal(out[2], clips[2].flip(-1).flip(0))
    assert torch.equal(clips[0, 0, 0, 0], torch.arange(5, dtype=torch.float32))  # input untouched


# --------------------------------------------------------------------------- jitter and mixing


def test_temporal_indices_centres_jitter_and_speed():
    centres = temporal_indices(16, 8, 3, jitter=False)
    assert torch.equal(centres, torch.arange(1, 16, 2).expand(3, 8))
    g = torch.Generator().manual_seed(0)
    jit = temporal_indices(16, 8, 200, g, jitter=True)
    segment = torch.arange(8) * 2
    assert ((jit >= segment) & (jit < segment + 2)).all()  # one frame from each segment
    assert jit.unique(dim=0).shape[0] > 50  # many different views
    slow = temporal_indices(16, 8, 200, g, jitter=True, speed=(0.5, 0.5))
    spans = slow.max(1).values - slow.min(1).values
    assert (spans <= 8).all() and (slow[:, 1:] >= slow[:, :-1]).all()  # half the clip, in order
    assert slow.min(1).values.unique().numel() > 3  # starting anywhere the span fits
    with pytest.raises(ValueError, match="speed"):
        temporal_indices(16, 8, 1, speed=(0.0, 1.0))


def test_random_resized_crops_stay_inside_and_resample_exactly():
    boxes = random_crop_boxes(500, 0.5, torch.Generator().manual_seed(0))
    cx, cy, w, h = boxes.unbind(1)
    area = w * h
    assert (area >= 0.5 - 1e-9).all() and (area <= 1 + 1e-9).all()
    assert ((cx - w >= -1 - 1e-9) & (cx + w <= 1 + 1e-9) & (cy - h >= -1 - 1e-9) & (cy + h <= 1 + 1e-9)).all()
    ramp = torch.arange(16, dtype=torch.float64).expand(2, 3, 3, 16, 16).contiguous()  # value = column index
    same = crop_resize(ramp, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(same, ramp)
    left = crop_resize(ramp, torch.tensor([[-0.5, 0.0, 0.5, 1.0]] * 2, dtype=torch.float64))
    # output column j samples input column ((j + 0.5) / 16) * 8 - 0.5: the left half stretched
    want = ((torch.arange(16, dtype=torch.float64) + 0.5) / 16 * 8 - 0.5).clamp(min=0)
    torch.testing.assert_close(left[0, 0, 0], want.expand(16, 16))
    with pytest.raises(ValueError, match="min_area"):
        random_crop_boxes(2, 0.0)


def test_mixup_blends_clips_and_targets_by_one_weight():
    g = torch.Generator().manual_seed(3)
    clips = torch.randn(4, 2, 3, 8, 8)
    targets = one_hot(torch.tensor([0, 1, 2, 3]), 5)
    mixed, soft, lam = mix_clips(clips, targets, mixup_alpha=0.4, generator=g)
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed, lam * clips + (1 - lam) * clips.flip(0))
    torch.testing.assert_close(soft, lam * targets + (1 - lam) * targets.flip(0))
    torch.testing.assert_close(soft.sum(1), torch.ones(4))


def test_cutmix_pastes_one_box_into_every_frame_and_weights_by_area():
    g = torch.Generator().manual_seed(5)
    clips = torch.stack([torch.full((3, 3, 10, 10), float(i)) for i in range(4)])
    targets = one_hot(torch.arange(4), 4)
    mixed, soft, lam = mix_clips(clips, targets, cutmix_alpha=1.0, generator=g)
    from_partner = (mixed[0] == 3.0)  # clip 0's partner is clip 3
    assert from_partner.any() and (from_partner == from_partner[0:1, 0:1]).all()  # same box in all frames/channels
    assert lam == pytest.approx(1.0 - from_partner[0, 0].float().mean().item())
    torch.testing.assert_close(soft[0], torch.tensor([lam, 0.0, 0.0, 1 - lam]))


def test_soft_targets_loss_matches_hard_labels_and_mixes_linearly():
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    hard, _ = classification_loss(logits, labels, 0.1)
    soft, _ = classification_loss(logits, one_hot(labels, 5), 0.1)
    torch.testing.assert_close(hard, soft)
    half, per = classification_loss(logits, 0.5 * one_hot(labels, 5) + 0.5 * one_hot(labels.flip(0), 5), 0.0)
    a = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    b = torch.nn.functional.cross_entropy(logits, labels.flip(0), reduction="none")
    torch.testing.assert_close(per, 0.5 * a + 0.5 * b)
    with pytest.raises(ValueError, match="soft targets"):
        classification_loss(logits, torch.rand(6, 4), 0.0)


# --------------------------------------------------------------------------- in the step source


class _FakeVideos:
    """Cached clips whose pixels say their class: a bright column at the left (move_left) or right
    (move_right); for grow / shrink a frame brightness that rises (grow) or falls (shrink) in time."""

    classes = ["move_left", "move_right", "grow", "shrink"]

    def __init__(self, per_class: int = 8, frames: int = 8) -> None:
        self.norm = Normaliser((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        clips, labels = [], []
        ramp = (torch.arange(frames) * 20 + 10).to(torch.uint8).view(frames, 1, 1, 1)
        for c in range(4):
            for _ in range(per_class):
                clip = torch.zeros(frames, 3, 8, 8, dtype=torch.uint8)
                if c == 0:
                    clip[..., 0] = 255
                elif c == 1:
                    clip[..., -1] = 255
                else:
                    clip[:] = ramp if c == 2 else ramp.flip(0)
                clips.append(clip)
                labels.append(c)
        self.clips, self.labels = torch.stack(clips), torch.tensor(labels)
        self.prompt_tokens = [torch.full((1, 3), c + 1) for c in range(4)]

    def __len__(self) -> int:
        return len(self.labels)


class _Uniform:
    def __init__(self, n: int) -> None:
        self.g, self.n = torch.Generator().manual_seed(0), n

    def sample_global(self, k: int) -> torch.Tensor:
        return torch.randint(self.n, (k,), generator=self.g)


def _content_class(clip: torch.Tensor) -> int:
    """The class a clip's pixels show (see _FakeVideos)."""
    first, last = clip[0].mean(), clip[-1].mean()
    if first != last:
        return 2 if last > first else 3
    return 0 if clip[0, 0, 0, 0] > clip[0, 0, 0, -1] else 1


def test_step_source_relabels_every_flipped_or_reversed_clip_by_its_content():
    videos = _FakeVideos()
    maps = LabelMaps.from_dict({"hflip": {"move_left": "move_right"}, "reverse": {"grow": "shrink"},
                                "no_hflip": ["grow", "shrink"], "no_reverse": ["move_left", "move_right"]})
    augmenter = ClipAugmenter(ClipAugmentConfig(maps=maps, temporal_jitter=True), videos.classes, num_frames=4)
    source = MixedSource(StepMix(0, 16), 0, None, videos, None, _Uniform(len(videos)), video_text=True,
                         augmenter=augmenter)
    changed = 0
    for _ in range(30):
        drawn = source.next()
        batch = drawn.batch
        assert batch.videos.shape == (16, 4, 3, 8, 8)
        for clip, label, text, vid in zip(batch.videos, batch.video_labels, batch.video_texts, drawn.video_ids):
            assert _content_class(clip) == int(label)  # the label always says what the pixels show
            assert int(text[0]) == int(label) + 1  # and the prompt follows the new label
            changed += int(label) != int(videos.labels[vid])
    assert changed > 50


def test_step_source_without_maps_keeps_clips_and_labels():
    videos = _FakeVideos(frames=4)
    augmenter = ClipAugmenter(ClipAugmentConfig(), videos.classes, num_frames=4)
    source = MixedSource(StepMix(0, 8), 0, None, videos, None, _Uniform(len(videos)), augmenter=augmenter)
    drawn = source.next()
    torch.testing.assert_close(drawn.batch.videos, videos.norm.to_float(videos.clips[drawn.video_ids]))
    assert torch.equal(drawn.batch.video_labels, videos.labels[drawn.video_ids])


def test_step_source_mixup_gives_soft_targets_and_the_larger_shares_text():
    videos = _FakeVideos(frames=4)
    augmenter = ClipAugmenter(ClipAugmentConfig(mixup=1.0), videos.classes, num_frames=4, seed=2)
    source = MixedSource(StepMix(0, 8), 0, None, videos, None, _Uniform(len(videos)), augmenter=augmenter)
    for _ in range(5):
        batch = source.next().batch
        soft = batch.video_labels
        assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
        top = soft.argmax(1)
        strongest = soft.max(1).values > 0.5
        assert torch.equal(batch.video_texts[strongest, 0] - 1, top[strongest])


# --------------------------------------------------------------------------- in training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from _train_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("augdata"))


def test_training_refuses_a_bad_augment_json_before_decoding(tiny_data, tmp_path):
    from _train_helpers import tiny_config

    from ernie_vl.train import train

    path = tiny_data["videos"] / "augment.json"
    path.write_text(json.dumps({"hflip": {"move_left": "move_up"}}))
    try:
        with pytest.raises(ValueError, match=r"unknown class\(es\) \['move_up'\].*grow"):
            train(tiny_config(tiny_data, tmp_path / "bad", max_steps=1))
        path.unlink()
        with pytest.raises(ValueError, match="sends class 'shrink' to two classes, 'grow' and 'move_left'"):
            train(tiny_config(tiny_data, tmp_path / "bad2", max_steps=1,
                              reverse_map={"grow": "shrink", "shrink": "move_left"}))
    finally:
        path.unlink(missing_ok=True)


def test_augmented_training_logs_its_choices_and_resumes_exactly(tiny_data, tmp_path):
    from _train_helpers import read_log, tiny_config

    from ernie_vl.train import train

    (tiny_data["videos"] / "augment.json").write_text(json.dumps({"hflip": {"move_left": "move_right"},
                                                                  "no_hflip": ["grow"]}))
    try:
        kw = dict(max_steps=6, batch_videos=4, temporal_jitter=True, speed_min=0.75, mixup=0.4,
                  reverse_map={"grow": "shrink"})
        full = train(tiny_config(tiny_data, tmp_path / "full", **kw))
        train(tiny_config(tiny_data, tmp_path / "part", **kw), stop_after=3)
        rest = train(tiny_config(tiny_data, tmp_path / "part", resume=True, **kw))
    finally:
        (tiny_data["videos"] / "augment.json").unlink()
    assert full.steps == rest.steps == 6
    setup = json.loads((tmp_path / "full" / "setup.json").read_text())
    aug = setup["augment"]
    assert aug["hflip"]["swaps"] == [["move_left", "move_right"]] and aug["hflip"]["never"] == ["grow"]
    assert aug["reverse"]["swaps"] == [["grow", "shrink"]]  # the flag's map, on top of the file
    assert aug["temporal_jitter"] is True and aug["speed_span"] == [0.75, 1.0] and aug["mixup"] == 0.4
    log_full, log_part = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert log_full[0]["setup"] == setup
    assert [r["step"] for r in log_part] == list(range(1, 7))
    for a, b in zip(log_full, log_part):
        assert a["video_cls"] == pytest.approx(b["video_cls"], abs=1e-6, rel=0)


def test_streaming_path_flips_and_resumes_with_its_pending_draws(tiny_data, tmp_path):
    from _train_helpers import read_log, tiny_config

    from ernie_vl.train import train

    kw = dict(max_steps=4, batch_videos=4, cache_max_mb=0.0, hflip_map={"move_left": "move_right"},
              p_hflip=1.0, speed_min=0.5)
    train(tiny_config(tiny_data, tmp_path / "s", **kw), stop_after=2)
    rest = train(tiny_config(tiny_data, tmp_path / "s", resume=True, **kw))
    assert rest.steps == 4 and [r["step"] for r in read_log(tmp_path / "s")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "s" / "setup.json").read_text())["augment"]["hflip"]["p"] == 1.0
