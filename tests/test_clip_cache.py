"""The decoded-clip cache is data only (safetensors + a JSON header), never a pickle: a tampered,
truncated or foreign file is rejected with a clear error and decoded again."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ernie_vl.data.clip_cache import ClipCacheError, cached_clips, load_clips, save_clips


def _value(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"keep": [0, 2, 5][:n], "clips": torch.randint(0, 256, (n, 2, 3, 4, 4), generator=g, dtype=torch.uint8),
            "labels": torch.tensor([1, 0, 1][:n])}


def _only_file(folder: Path) -> Path:
    files = list(folder.glob("*"))
    assert len(files) == 1, files
    return files[0]


def test_round_trip_and_reuse(tmp_path):
    calls = []
    decode = lambda: (calls.append(1), _value())[1]  # noqa: E731
    first = cached_clips(tmp_path, ["videos", 1], decode)
    again = cached_clips(tmp_path, ["videos", 1], decode)
    assert len(calls) == 1
    assert torch.as_tensor(again["keep"]).tolist() == [0, 2, 5]
    assert torch.equal(again["clips"], first["clips"]) and torch.equal(again["labels"], first["labels"])
    path = _only_file(tmp_path)
    assert path.suffix == ".safetensors"
    with pytest.raises(Exception):
        pickle.loads(path.read_bytes())  # not a pickle
    assert cached_clips(tmp_path, ["videos", 2], decode) is not None and len(calls) == 2  # a new key decodes


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "pickle", "wrong_key", "wrong_dtype"])
def test_a_bad_cache_file_is_rejected_and_rebuilt(tmp_path, damage):
    cached_clips(tmp_path, ["k"], _value)
    path = _only_file(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 10])
        reason = "unreadable"
    elif damage == "flip_byte":  # a pixel changed after the header: only the checksum sees it
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
        reason = "checksum mismatch"
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"keep": [0], "clips": None, "labels": None}))
        reason = "unreadable"
    elif damage == "wrong_key":
        save_clips(path, _value(), key="other")
        reason = "written for key 'other'"
    else:
        v = _value()
        v["labels"] = v["labels"].int()
        with pytest.raises(TypeError, match="'labels' must be torch.int64"):
            save_clips(path, v, key="x")
        from safetensors.torch import save_file

        name = path.name.split(".")[0]
        t = {"keep": torch.tensor([0]), "clips": torch.zeros(1, 1, 3, 2, 2, dtype=torch.uint8),
             "labels": torch.tensor([0], dtype=torch.int32)}
        save_file(t, str(path), metadata={"format": "ernie-vl-decoded-clips-v1", "key": name, "sha256": "0"})
        reason = "'labels' is torch.int32"
    name = path.name.split(".")[0]
    with pytest.raises(ClipCacheError, match=reason) as err:
        load_clips(path, name)
    assert str(path) in str(err.value)
    calls = []
    with pytest.warns(UserWarning, match="decoding again"):
        got = cached_clips(tmp_path, ["k"], lambda: (calls.append(1), _value())[1])
    assert calls == [1] and torch.equal(got["clips"], _value()["clips"])
    assert torch.equal(load_clips(path, name)["clips"], _value()["clips"])  # rebuilt in place


def test_cached_videos_use_the_safe_cache(tmp_path):
    av = pytest.importorskip("av")  # noqa: F841
    from _video_fixtures import write_solid_clip

    import ernie_vl
    from ernie_vl.data.sources import CachedVideos

    root = tmp_path / "videos"
    for name, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / name).mkdir(parents=True)
        write_solid_clip(root / name / "a.mp4", rgb)
    (root / "red" / "broken.mp4").write_bytes(b"not a video")
    tok = ernie_vl.get_tokenizer("test")
    kw = dict(num_frames=2, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), tokenizer=tok, num_workers=0,
              progress=False, cache_dir=tmp_path / "cache")
    first = CachedVideos([root], **kw)
    files = list((tmp_path / "cache").glob("*"))
    assert [f.suffix for f in files] == [".safetensors"]
    again = CachedVideos([root], **kw)
    assert torch.equal(first.clips, again.clips) and first.paths == again.paths and again.failures.count == 1
    assert again.failures.files[0][0].endswith("broken.mp4")
