"""WebDataset shards: brace expansion, the tar iterator (malformed shards name the shard and member), the
`ernie-vl shard` writer, training and evaluation from shards, worker/rank splitting and exact resume."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _train_helpers import read_log


def write_csv(root: Path, count: int, size: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["filepath,caption"]
    for i in range(count):
        ext = ("png", "jpg", "webp")[i % 3]
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "img" / f"{i:04d}.{ext}")
        lines.append(f"img/{i:04d}.{ext},caption {i}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png_bytes(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_brace_expansion_keeps_zero_padding_and_lists():
    from ernie_vl.data.shards import expand_braces, is_shard_spec

    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert is_shard_spec("x/{000..009}.tar") and is_shard_spec("a.tar") and not is_shard_spec("a.csv")
    with pytest.raises(ValueError, match="range"):
        expand_braces("x/{abc}.tar")


def test_iterator_groups_members_by_key_and_reads_json_captions(tmp_path):
    from ernie_vl.data.shards import iter_shard

    shard = tmp_path / "a.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "dir/k1.png", png_bytes(1))
        add(tar, "dir/k1.txt", b"first")
        add(tar, "k2.jpg", b"not really a jpeg")
        add(tar, "k2.json", json.dumps({"caption": "second", "width": 8}).encode())
        add(tar, "k3.txt", b"no image here")
    samples = list(iter_shard(str(shard)))
    assert [(s.key, sorted(s.files)) for s in samples] == [("dir/k1", ["png", "txt"]), ("k2", ["jpg", "json"]),
                                                           ("k3", ["txt"])]
    assert [s.caption() for s in samples] == ["first", "second", "no image here"]


def test_a_truncated_shard_names_the_shard_and_the_member(tmp_path):
    from ernie_vl.data.shards import ShardError, iter_shard

    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            add(tar, f"{i}.png", png_bytes(i) * 20)
            add(tar, f"{i}.txt", b"x")
    with tarfile.open(shard) as tar:
        second = tar.getmember("1.png")
    shard.write_bytes(shard.read_bytes()[:second.offset_data + second.size // 2])  # cut inside the second image
    got = []
    with pytest.raises(ShardError, match=r"bad\.tar.*after member '0\.txt'") as err:
        for sample in iter_shard(str(shard)):
            got.append(sample.key)
    assert err.value.shard == str(shard) and err.value.member == "0.txt"
    assert got == []  # the first sample is complete only once the next key starts; the cut came first


def test_shard_command_writes_shards_that_read_back_and_webdataset_reads_them(tmp_path, capsys):
    from ernie_vl.app.cli import main
    from ernie_vl.data.shards import iter_shard, shard_list

    csv = write_csv(tmp_path / "data", 7)
    with open(csv, "a") as f:
        f.write("img/missing.png,gone\nimg/0001.jpg,\n")
    assert main(["shard", str(csv), str(tmp_path / "shards"), "--per-shard", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 7 and summary["pattern"].endswith("{00000..00002}.tar") and summary["shards"] == 3
    assert sorted(f["reason"].split(":")[0] for f in summary["skipped"]) == ["FileNotFoundError", "empty caption"]
    urls = shard_list(summary["pattern"])
    samples = [s for u in urls for s in iter_shard(u)]
    assert [s.caption() for s in samples] == [f"caption {i}" for i in range(7)]
    assert samples[2].files["webp"] == (tmp_path / "data" / "img" / "0002.webp").read_bytes()  # bytes as they were
    wds = pytest.importorskip("webdataset")
    theirs = list(wds.WebDataset(urls, shardshuffle=False))
    assert [(x["__key__"], x["txt"].decode()) for x in theirs] == [(s.key, s.caption()) for s in samples]


def test_split_across_consumers_covers_every_sample_once(tmp_path):
    import ernie_vl
    from ernie_vl.data.shard_stream import ShardBatches
    from ernie_vl.data.shards import write_shards

    written = write_shards(write_csv(tmp_path / "data", 24), tmp_path / "shards", per_shard=4, progress=False)
    pre = ernie_vl.create_model("test").preprocess
    for shards in (written["shards"], written["shards"][:1]):  # 6 shards by shard; 1 shard by sample
        seen = []
        for rank in range(2):
            data = ShardBatches(shards, pre, 2, rank=rank, world_size=2, shuffle_buffer=3, epochs=1, drop_last=False)
            for _, captions, _, _, _ in data:
                seen += captions
        expect = range(24) if len(shards) > 1 else range(4)
        assert sorted(seen) == sorted(f"caption {i}" for i in expect)


def test_train_from_shards_resumes_exactly_and_lists_bad_samples(tmp_path):
    from ernie_vl.data.shards import write_shards
    from ernie_vl.train import TrainConfig, train

    written = write_shards(write_csv(tmp_path / "data", 40), tmp_path / "shards", per_shard=8, progress=False)
    assert written["samples"] == 40 and len(written["shards"]) == 5  # 00000..00004; two bad shards follow
    with tarfile.open(tmp_path / "shards" / "00005.tar", "w") as tar:  # a sample with a broken image
        add(tar, "broken.png", b"not a png")
        add(tar, "broken.txt", b"broken")
    (tmp_path / "shards" / "00006.tar").write_bytes(b"\0" * 100 + b"garbage")  # not a tar at all
    spec = str(tmp_path / "shards" / "{00000..00006}.tar")
    common = dict(model="test", pairs=[spec], batch_pairs=4, warmup_steps=1, lr=1e-3, num_workers=2,
                  progress=False, threads=1, seed=0, decode_cache=None, checkpoint_every=3)
    full = train(TrainConfig(out=str(tmp_path / "full"), max_steps=12, **common))  # > 1 epoch of each worker
    train(TrainConfig(out=str(tmp_path / "half"), max_steps=12, **common), stop_after=3)
    resumed = train(TrainConfig(out=str(tmp_path / "half"), max_steps=12, resume=True, **common))
    assert resumed.steps == full.steps == 12
    a = [r["loss"] for r in read_log(tmp_path / "full")]
    b = [r["loss"] for r in read_log(tmp_path / "half")]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    listed = [f for r in read_log(tmp_path / "full") for f in r.get("skipped", {}).get("files", [])]
    reasons = " | ".join(f"{f['path']}: {f['reason']}" for f in listed)
    assert "00005.tar#broken" in reasons and "00006.tar" in reasons and "malformed shard" in reasons


def test_eval_reads_shards(tmp_path, capsys):
    import ernie_vl
    from ernie_vl.app.cli import main
    from ernie_vl.data.shards import write_shards

    csv = write_csv(tmp_path / "data", 10)
    written = write_shards(csv, tmp_path / "shards", per_shard=4, progress=False)
    model_dir = tmp_path / "model"
    ernie_vl.create_model("test").save_pretrained(model_dir)
    assert main(["eval", "--model", str(model_dir), "--pairs", written["pattern"], "--json"]) == 0
    from_shards = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(model_dir), "--pairs", str(csv), "--json"]) == 0
    from_csv = json.loads(capsys.readouterr().out)
    assert from_shards["num_pairs"] == from_csv["num_pairs"] == 10
    for key in ("text_to_image_R@1", "image_to_text_R@5"):
        assert from_shards[key] == pytest.approx(from_csv[key])
