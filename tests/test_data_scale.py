"""Training data of any size: bounded file descriptors (a subprocess under RLIMIT_NOFILE 256 with 2 workers),
bounded memory when streaming, the memory-mapped decode cache (reuse, resume), skipped items in log.jsonl."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RUNNER = Path(__file__).with_name("_data_scale_run.py")
ROOT = Path(__file__).resolve().parents[1]


def write_pairs(root: Path, count: int, size: int = 8, seed: int = 0) -> Path:
    """``count`` random size x size PNGs and ``pairs.csv`` (one caption per image)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["filepath,caption"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "img" / f"{i:05d}.png")
        lines.append(f"img/{i:05d}.png,picture number {i % 50}")
    csv = root / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def run(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ram", "cache", "stream"])
def test_3000_images_train_with_2_workers_under_256_file_descriptors(tmp_path, mode):
    csv = write_pairs(tmp_path / "data", 3000)
    with open(csv, "a") as f:  # one missing file and one empty caption: skipped and listed, not fatal
        f.write("img/missing.png,a picture that is not there\nimg/00001.png,\n")
    out = tmp_path / f"run-{mode}"
    result = run({"csv": str(csv), "out": str(out), "mode": mode, "nofile": 256, "workers": 2, "steps": 3,
                  "cache_dir": str(tmp_path / "cache")})
    assert result["steps"] == 3
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    listed = {(f["path"], f["reason"]) for r in log for f in r.get("skipped", {}).get("files", [])}
    assert (str(csv.parent / "img" / "00001.png"), "empty caption") in listed
    if mode != "stream":  # a streaming run meets the missing file only if a step draws it
        assert any(p.endswith("missing.png") and "no such file" in why for p, why in listed)
    if mode == "cache":
        assert len(list((tmp_path / "cache").glob("*.u8"))) == 1


def test_streaming_keeps_peak_memory_bounded_when_the_set_exceeds_the_budget(tmp_path):
    """At 160 px, 3,000 images decode to 220 MB of uint8 and 9,000 to 660 MB. With a 1 MB budget the
    run streams: its peak RSS is the same for both sizes. The control shows the measurement sees a
    decoded set: decoding 3,000 into RAM holds at least that much more before the first step."""
    small = write_pairs(tmp_path / "small", 3000, size=16)
    large = write_pairs(tmp_path / "large", 9000, size=16)
    decoded_mb = 3000 * 3 * 160 * 160 / 2**20
    common = {"workers": 2, "steps": 3, "image_size": 160}
    got = {}
    for name, csv, mode in (("stream-3k", small, "stream"), ("stream-9k", large, "stream"), ("ram-3k", small, "ram")):
        got[name] = run({**common, "csv": str(csv), "out": str(tmp_path / name), "mode": mode})
    growth = {name: r["rss_peak_mb"] - r["rss_before_mb"] for name, r in got.items()}
    held = {name: r["rss_ready_mb"] - r["rss_before_mb"] for name, r in got.items()}
    assert got["stream-3k"]["streaming"] and got["stream-9k"]["streaming"] and not got["ram-3k"]["streaming"]
    assert held["ram-3k"] - held["stream-3k"] > 0.9 * decoded_mb, (held, decoded_mb)
    assert growth["stream-9k"] - growth["stream-3k"] < 0.1 * 2 * decoded_mb, growth  # 6k more images: < 44 MB
    assert held["stream-9k"] - held["stream-3k"] < 0.1 * 2 * decoded_mb, held


def test_an_interrupted_decode_resumes_where_it_stopped(tmp_path, monkeypatch):
    import torch

    import ernie_vl
    from ernie_vl.data import image_cache
    from ernie_vl.data.pairs import PairList

    csv = write_pairs(tmp_path / "data", 200)  # batches of 64: progress records at 64 and 128
    listed = PairList.from_csvs([csv])
    model = ernie_vl.create_model("test")
    monkeypatch.setattr(image_cache, "PROGRESS_EVERY", 10)
    calls = []

    def stop_after_two(done, failed, real=None):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    original = image_cache.decode_into

    def interrupted(*args, **kwargs):
        inner = kwargs["checkpoint"]
        kwargs["checkpoint"] = lambda done, failed: (inner(done, failed), stop_after_two(done, failed))
        return original(*args, **kwargs)

    monkeypatch.setattr(image_cache, "decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        image_cache.decode_images(listed.paths, model.preprocess, tmp_path / "cache", [listed.digest], 0, False)
    progress = json.loads(next((tmp_path / "cache").glob("*.progress.json")).read_text())
    assert progress["done"] == calls[-1] > 0
    monkeypatch.setattr(image_cache, "decode_into", original)
    starts = []
    monkeypatch.setattr(image_cache, "decode_into", lambda *a, **k: (starts.append(k.get("start", 0)), original(*a, **k))[1])
    resumed = image_cache.decode_images(listed.paths, model.preprocess, tmp_path / "cache", [listed.digest], 0, False)
    assert starts == [progress["done"]] == [128]
    fresh = image_cache.decode_images(listed.paths, model.preprocess, None, [], 0, False)
    assert torch.equal(resumed.pixels, fresh.pixels) and resumed.cache_file.suffix == ".u8"


def test_a_csv_that_is_not_utf8_names_the_file_and_the_line(tmp_path):
    from ernie_vl.data.pairs import PairList

    csv = tmp_path / "latin1.csv"
    csv.write_bytes("filepath,caption\na.png,a cat\nb.png,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv.*line 3"):
        PairList.from_csvs([csv])


def _decode_in_process(args):
    csv, cache = args
    import ernie_vl
    from ernie_vl.data.image_cache import decode_images
    from ernie_vl.data.pairs import PairList

    listed = PairList.from_csvs([csv])
    got = decode_images(listed.paths, ernie_vl.create_model("test").preprocess, cache, [listed.digest], 0, False)
    return got.pixels.numpy().copy(), str(got.cache_file)


def test_two_processes_decoding_one_cache_entry_share_one_file(tmp_path):
    import multiprocessing

    csv = write_pairs(tmp_path / "data", 300)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        (a, file_a), (b, file_b) = pool.map(_decode_in_process, [(str(csv), str(tmp_path / "cache"))] * 2)
    assert file_a == file_b and np.array_equal(a, b)
    assert [p.suffix for p in (tmp_path / "cache").glob("*.u8*")] == [".u8"]
