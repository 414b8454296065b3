"""Real-world properties: damaged frames concealed (and counted in batch summaries), colour range,
rotation, 10-bit, non-UTF-8 metadata."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from _video_fixtures import coded_index, mux_frames, with_garbage_packets, write_clip, write_mjpeg_clip
from _video_models import BlueLevelClassifier
from video import VideoDecodeError, VideoFolder, evaluate, open_video
from video.transforms import build_clip_transform
from video_corpus import ClipSpec, reference_frames, write_spec


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    clean = write_mjpeg_clip(root / "clean.mp4")
    return {
        "clean": clean,
        "one": with_garbage_packets(clean, root / "one_bad.mp4", [7]),
        "three": with_garbage_packets(clean, root / "three_bad.mp4", [7, 12, 17]),
    }


@pytest.mark.parametrize("isolation", ["auto", "inline", "process"])
def test_an_undecodable_frame_is_replaced_by_its_nearest_decodable_neighbour(damaged, isolation):
    reader = open_video(damaged["one"], isolation=isolation)
    assert len(reader) == 40  # the packet is there; its data is not a frame
    frames = reader.get_frames_numpy([2, 7, 12, 17, 22])
    assert reader.last_concealed == [7]
    assert coded_index(frames[..., 0].reshape(5, -1).mean(1)) == [2, 6, 12, 17, 22]  # 6 and 8 tie: the earlier
    assert np.array_equal(frames[1], reference_frames(damaged["clean"], [6])[0])
    assert np.array_equal(frames[[0, 2, 3, 4]], reference_frames(damaged["clean"], [2, 12, 17, 22]))
    reader.get_frames_numpy([2, 12])
    assert reader.last_concealed == []


@pytest.mark.parametrize("isolation", ["auto", "process"])
def test_too_much_damage_fails_the_clip(damaged, isolation):
    reader = open_video(damaged["three"], isolation=isolation)
    with pytest.raises(VideoDecodeError, match=r"3 of 8 requested frames could not be decoded.*25%") as err:
        reader.get_frames([2, 7, 12, 17, 22, 27, 32, 37])
    assert err.value.path == str(damaged["three"])
    tolerant = open_video(damaged["three"], isolation=isolation, max_concealed=0.5)
    tolerant.get_frames([2, 7, 12, 17, 22, 27, 32, 37])
    assert tolerant.last_concealed == [7, 12, 17]
    with pytest.raises(ValueError, match="max_concealed"):
        open_video(damaged["one"], max_concealed=1.5)


def test_batch_over_good_damaged_and_unreadable_files_reports_both_counts(damaged, tmp_path):
    root = tmp_path / "videos"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    write_clip(root / "a" / "good.mp4", num_frames=40, blue=0)
    (root / "a" / "one_bad.mp4").write_bytes(damaged["one"].read_bytes())  # TSN centres 2, 7, ...: 1 of 8
    (root / "b" / "three_bad.mp4").write_bytes(damaged["three"].read_bytes())  # 3 of 8: fails
    (root / "b" / "unreadable.mp4").write_text("not a video\n")
    write_clip(root / "b" / "good.mp4", num_frames=40, blue=255)
    ds = VideoFolder(root, num_frames=8, sampling="tsn",
                     transform=build_clip_transform(False, 16, mean=(0, 0, 0), std=(1, 1, 1)))
    result = evaluate(BlueLevelClassifier([0.0, 1.0]), ds, batch_size=2, num_workers=2, out_dir=tmp_path / "out",
                      progress=False)
    assert result.num_videos == 5 and result.num_evaluated == 3
    assert sorted(f["path"].rsplit("/", 1)[-1] for f in result.failures) == ["three_bad.mp4", "unreadable.mp4"]
    assert [(c["path"].rsplit("/", 1)[-1], c["frames"]) for c in result.concealed] == [("one_bad.mp4", [7])]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["num_failed"], metrics["num_concealed_clips"], metrics["num_concealed_frames"]) == (2, 1, 1)
    assert ds.concealment_report()["frames"] == 1
    clip, sampled = ds.load_frames([p for p, _ in ds.samples].index(str(root / "a" / "one_bad.mp4")))
    assert sampled.concealed == (7,) and sampled.indices.tolist() == [2, 7, 12, 17, 22, 27, 32, 37]


def _solid(path, codec, pix_fmt, rgb, options=None, full_range=False):
    """4 frames of one colour; ``full_range``: converted to full-range YUV and flagged so (no yuvj format)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
        stream.options = options or {}
        if full_range:
            stream.codec_context.color_range = 2
        img = np.zeros((32, 32, 3), np.uint8)
        img[...] = rgb
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        if full_range:
            frame = frame.reformat(format=pix_fmt, dst_color_range=2)
            frame.color_range = 2
        mux_frames(container, stream, [frame] * 4)
    return path


COLOURS = [(200, 30, 90), (235, 235, 235), (20, 20, 20)]  # near the ends: a range mix-up shows most


@pytest.mark.parametrize("rgb", COLOURS)
def test_full_and_limited_range_and_ten_bit_come_out_as_encoded(tmp_path, rgb):
    x265 = {"preset": "ultrafast", "x265-params": "log-level=none:range=full", "crf": "4"}
    clips = {
        "limited 8-bit": _solid(tmp_path / "lim.mp4", "libx264", "yuv420p", rgb, {"crf": "4"}),
        "full 8-bit (yuvj)": _solid(tmp_path / "full.mp4", "libx264", "yuvj420p", rgb, {"crf": "4"}),
        "full 10-bit (range flag)": _solid(tmp_path / "full10.mp4", "libx265", "yuv420p10le", rgb, x265, True),
        "limited 10-bit": _solid(tmp_path / "lim10.mp4", "libx264", "yuv420p10le", rgb, {"crf": "4"}),
    }
    for label, path in clips.items():
        reader = open_video(path)
        frame = reader.get_frames([1])[0].float()
        assert frame.dtype == torch.float32 and reader.get_frames([1]).dtype == torch.uint8
        err = (frame - torch.tensor(rgb, dtype=torch.float32)).abs().max().item()
        assert err <= 4.0, f"{label}: decoded {frame[16, 16].tolist()} for {rgb}"
    # the full-range HEVC frame is yuv420p10le with a range flag: read as limited range it is visibly
    # wrong, so the check above can fail
    with av.open(str(clips["full 10-bit (range flag)"])) as container:
        wrong = next(container.decode(video=0)).to_ndarray(format="rgb24", src_color_range=1).astype(float)
    assert np.abs(wrong - np.array(rgb)).max() > 8


def test_portrait_phone_clip_comes_out_upright(tmp_path):
    portrait = np.zeros((64, 48, 3), np.uint8)  # tall: a red block in the top-left corner
    portrait[:16, :16, 0] = 255
    stored = np.rot90(portrait, k=-1)  # how a phone held upright stores it: sideways, 48 tall x 64 wide
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"crf": "4"}
        stream.set_display_rotation(90)  # the display matrix: turn 90 degrees counter-clockwise to show it
        mux_frames(container, stream,
                   (av.VideoFrame.from_ndarray(np.ascontiguousarray(stored), format="rgb24") for _ in range(3)))
    for isolation in ("auto", "process"):
        reader = open_video(path, isolation=isolation)
        frame = reader.get_frames_numpy([1])[0]
        assert frame.shape == (64, 48, 3)
        assert frame[:16, :16, 0].mean() > 240 and frame[-16:, -16:, 0].mean() < 15  # red corner top-left
    assert reader.info.rotation == 90 and reader.size == (64, 48)


def test_non_utf8_metadata_survives(tmp_path):
    """A clip whose metadata is not UTF-8 (seen in HMDB51): a plain ``av.open`` raises, ours reads it."""
    spec = ClipSpec("mpeg4", ".avi", frames=12)
    path = tmp_path / "latin1.avi"
    write_spec(spec, path)
    data = path.read_bytes()
    # add an INFO list with a Latin-1 title ("caf\xe9") to the AVI header list
    title = b"caf\xe9 cr\xe8me\x00"
    info = b"LIST" + (4 + 8 + len(title)).to_bytes(4, "little") + b"INFO" + b"INAM" + len(title).to_bytes(4, "little") + title
    hdrl = data.index(b"hdrl") - 8
    size = int.from_bytes(data[hdrl + 4:hdrl + 8], "little")
    end = hdrl + 8 + size
    patched = bytearray(data[:end] + info + data[end:])
    patched[4:8] = (int.from_bytes(data[4:8], "little") + len(info)).to_bytes(4, "little")
    path.write_bytes(bytes(patched))
    with pytest.raises(UnicodeDecodeError):
        av.open(str(path)).close()
    reader = open_video(path)
    assert len(reader) == 12
    assert np.array_equal(reader.get_frames_numpy([0, 11]), reference_frames_ignoring_metadata(path, [0, 11]))


def reference_frames_ignoring_metadata(path, indices):
    got = {}
    with av.open(str(path), metadata_errors="ignore") as container:
        for i, frame in enumerate(container.decode(video=0)):
            got[i] = frame.to_ndarray(format="rgb24")
    return np.stack([got[i] for i in indices])
