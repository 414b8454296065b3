"""`ernie-vl embed` into parts (1 and 2 gloo processes, resume, skipped files, CSV and shards) and
`ernie-vl index EMB/` / `Index.build_from_parts` (flat, IVF-PQ under a budget, refusals)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ernie_vl.app.cli import main
from retrieval.index import Index
from retrieval.index_parts import build_from_parts, parse_memory, plan_ivfpq
from retrieval.parts import PartsError, finished_parts, read_manifest, write_part

from _retrieval_helpers import write_color_image

N_IMAGES = 11


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import ernie_vl

    folder = tmp_path_factory.mktemp("ckpt")
    ernie_vl.create_model("test").save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        write_color_image(root / f"sub{i % 2}" / f"img{i:02d}.png", tuple(int(v) for v in rng.integers(0, 256, 3)),
                          size=(20 + i, 16 + i))
    (root / "sub0" / "img05b.jpg").write_bytes(b"not a jpeg at all")  # unreadable: skipped and listed
    return root


def _embed(checkpoint, data, out, *extra) -> dict:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["embed", checkpoint, str(data), "--out", str(out), "--part-size", "4", "--dtype", "float32",
                   "--workers", "0", "--batch-size", "3", "--no-progress", *extra])
    assert rc == 0, buf.getvalue()
    return json.loads(buf.getvalue())


def _collect(folder) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(ids, vectors, metadata rows) of every part, sorted by id."""
    ids, vecs, rows = [], [], []
    for _, p in sorted(finished_parts(folder).items()):
        if p.count:
            part_rows = p.rows()
            ids.extend(r["id"] for r in part_rows)
            rows.extend(part_rows)
            vecs.append(np.asarray(p.vectors(), np.float32))
    order = np.argsort(ids)
    return np.asarray(ids)[order], np.concatenate(vecs)[order], [rows[i] for i in order]


@pytest.fixture(scope="module")
def one_proc(checkpoint, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb1")
    return out, _embed(checkpoint, photos, out)


def test_embed_one_process_writes_parts_and_lists_skipped(one_proc, photos):
    out, summary = one_proc
    assert summary["items"] == N_IMAGES + 1 and summary["parts"] == 3 and summary["finished"]
    assert summary["embedded"] == N_IMAGES
    assert [s["item"] for s in summary["skipped"]] == [str(photos.resolve() / "sub0" / "img05b.jpg")]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json"] + [f"part-00000-{s:05d}.{e}" for s in range(3) for e in ("json", "jsonl", "npy")]
    manifest = read_manifest(out)
    assert manifest["dim"] == 32 and manifest["dtype"] == "float32" and manifest["model_id"].startswith("ernie-vl:")
    assert manifest["info"]["root"] == str(photos.resolve()) and manifest["skipped"] == 1
    ids, vecs, rows = _collect(out)
    files = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.*"))
    # ids are positions in the sorted file list; the unreadable file's id is a gap
    assert [r["path"] for r in rows] == [f for f in files if not f.endswith(".jpg")]
    assert ids.tolist() == [files.index(r["path"]) for r in rows]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_two_gloo_processes_match_one(one_proc, checkpoint, photos, tmp_path, capfd):
    out2 = tmp_path / "emb2"
    capfd.readouterr()
    assert main(["embed", checkpoint, str(photos), "--out", str(out2), "--part-size", "4", "--dtype", "float32",
                 "--workers", "0", "--batch-size", "3", "--no-progress", "--nproc", "2"]) == 0
    summary = json.loads(capfd.readouterr().out)   # rank 0 of the torchrun workers prints it
    assert summary["finished"] and summary["embedded"] == N_IMAGES
    parts = finished_parts(out2)
    assert {p.rank for p in parts.values()} == {0, 1}
    assert sorted(p.name for p in parts.values()) == ["part-00000-00000", "part-00000-00002", "part-00001-00001"]
    ids1, vecs1, rows1 = _collect(one_proc[0])
    ids2, vecs2, rows2 = _collect(out2)
    np.testing.assert_array_equal(ids1, ids2)
    assert rows1 == rows2
    np.testing.assert_allclose(vecs1, vecs2, rtol=0, atol=1e-5)
    m1, m2 = read_manifest(one_proc[0]), read_manifest(out2)
    assert {k: m1[k] for k in ("model_id", "dim", "items", "embedded", "skipped")} == \
           {k: m2[k] for k in ("model_id", "dim", "items", "embedded", "skipped")}


def test_killed_run_resumes_only_the_missing_part(checkpoint, photos, tmp_path):
    out = tmp_path / "emb"
    _embed(checkpoint, photos, out)
    before = _collect(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    for path in out.glob("part-00000-00002.*"):   # the node died while writing the last part
        path.unlink()
    (out / "manifest.json").unlink()
    summary = _embed(checkpoint, photos, out)
    assert summary["parts_embedded_by_rank0"] == [2] and summary["parts_reused_by_rank0"] == [0, 1]
    assert summary["embedded_now"] == 4 and summary["finished"]
    for name, stamp in stamps.items():
        if "-00002." not in name:
            assert (out / name).stat().st_mtime_ns == stamp, f"{name} was rewritten"
    after = _collect(out)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], atol=1e-6)
    assert before[2] == after[2]
    again = _embed(checkpoint, photos, out)   # all finished: nothing embedded
    assert again["embedded_now"] == 0 and again["parts_embedded_by_rank0"] == []


def test_rerun_with_other_part_size_refuses(checkpoint, photos, one_proc, capsys):
    rc = main(["embed", checkpoint, str(photos), "--out", str(one_proc[0]), "--part-size", "5", "--workers", "0",
               "--no-progress"])
    assert rc == 2 and "parts of 4" in capsys.readouterr().err


def test_csv_and_shards_embed_the_same_pairs(checkpoint, photos, tmp_path):
    from ernie_vl.data.shards import write_shards

    files = sorted(p for p in photos.rglob("*.png"))
    csv = tmp_path / "pairs.csv"
    lines = ["filepath,caption"] + [f"{f},photo {i}" for i, f in enumerate(files)] + ["missing.png,gone"]
    csv.write_text("\n".join(lines) + "\n")
    by_csv = _embed(checkpoint, csv, tmp_path / "emb_csv")
    assert by_csv["embedded"] == len(files) and len(by_csv["skipped"]) == 1
    assert by_csv["skipped"][0]["item"].endswith("missing.png")
    shards = write_shards(csv, tmp_path / "shards", per_shard=4, progress=False)
    by_shards = _embed(checkpoint, shards["pattern"], tmp_path / "emb_shards")
    assert by_shards["embedded"] == len(files) and by_shards["skipped"] == []
    broken = tmp_path / "shards" / "00009.tar"
    broken.write_bytes(b"\x00garbage that is not a tar file" * 40)
    with_bad = _embed(checkpoint, f"{tmp_path / 'shards'}/{{00000,00001,00002,00009}}.tar", tmp_path / "emb_bad")
    assert with_bad["embedded"] == len(files) and [s["shard"] for s in with_bad["unreadable_shards"]] == [str(broken)]
    assert read_manifest(tmp_path / "emb_bad")["info"]["unreadable_shards"][0][0] == str(broken)
    _, v_csv, r_csv = _collect(tmp_path / "emb_csv")
    _, v_sh, r_sh = _collect(tmp_path / "emb_shards")
    assert [r["caption"] for r in r_csv] == [f"photo {i}" for i in range(len(files))]
    assert [r["key"] for r in r_sh] == [f"{i:09d}" for i in range(len(files))]
    np.testing.assert_allclose(v_csv, v_sh, atol=1e-5)


def test_index_cli_builds_from_parts(one_proc, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(one_proc[0]), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == N_IMAGES and report["kind"] == "flat"
    index = Index.load(out)
    ids, vecs, rows = _collect(one_proc[0])
    found, scores = index.search(vecs, k=1)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.metadata(int(ids[0])) == {k: v for k, v in rows[0].items() if k != "id"}
    assert index.info["root"] == read_manifest(one_proc[0])["info"]["root"]
    # the index records the model and the photo folder: `ernie-vl search` finds a photo by itself
    capsys.readouterr()
    photo = Path(index.info["root"]) / rows[4]["path"]
    assert main(["search", str(out), "--image", str(photo), "-k", "1", "--json", "--mmap"]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["id"] == int(ids[4]) and hit["metadata"]["path"] == rows[4]["path"]


# ---------------------------------------------------------------- build_from_parts on synthetic parts


def _write_parts(folder: Path, vectors: np.ndarray, part_size: int, model_id: str = "m", dtype: str = "float16"):
    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(vectors), part_size)):
        x = vectors[start:start + part_size]
        rows = [{"id": start + i, "path": f"{start + i}.png"} for i in range(len(x))]
        write_part(folder, s % 2, s, start, start + len(x), x, rows, [], model_id, dtype)


def _clustered(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    x = centers[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_build_ivfpq_from_parts_matches_brute_force(tmp_path, monkeypatch):
    import retrieval.index_parts as ip

    x = _clustered(6000, 32)
    _write_parts(tmp_path / "emb", x, part_size=1000)
    seen = []
    real = ip.iter_part_chunks
    monkeypatch.setattr(ip, "CHUNK_ROWS", 700)
    monkeypatch.setattr(ip, "iter_part_chunks", lambda parts, chunk: (seen.append(len(c[0])) or c for c in real(parts, chunk)))
    index = Index.build_from_parts(tmp_path / "emb", kind="ivfpq", memory_budget="64M")
    assert index.kind == "ivfpq" and len(index) == 6000 and max(seen) <= 700 and sum(seen) == 6000
    plan = index.info["ivfpq_plan"]
    assert plan["nlist"] == 128 and index.params.ivf_nlist == 128 and index.params.pq_m == plan["pq_m"] == 8
    q = x[:200] + 0.05 * np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)
    truth = Index.build(x.astype(np.float16).astype(np.float32), kind="flat").search(q, 10)[0]
    got = index.search(q, 10)[0]
    whole = Index.build(x.astype(np.float16).astype(np.float32), kind="ivfpq", params=index.params)  # in memory
    recall, recall_whole = (np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r, truth)])
                            for r in (got, whole.search(q, 10)[0]))
    assert recall >= 0.45 and recall >= recall_whole - 0.05, (recall, recall_whole)  # PQ8 codes of 32-d vectors
    assert index.metadata(17) == {"path": "17.png"}
    index.save(tmp_path / "idx")
    np.testing.assert_array_equal(Index.load(tmp_path / "idx").search(q, 10)[0], got)


def test_plan_ivfpq_follows_n_and_budget():
    small, big = plan_ivfpq(10_000, 512, parse_memory("1G")), plan_ivfpq(1_000_000, 512, parse_memory("1G"))
    # ~4 sqrt(N) as a power of two (512, 4096), lowered to >= 39 training points per list (10k -> 256) and to
    # a training sample within a quarter of the budget (39 x 4096 x 2 KiB is over 256 MiB -> 2048)
    assert (small.nlist, big.nlist) == (256, 2048) and big.train_size * 512 * 4 <= parse_memory("1G") // 4
    assert big.pq_m == 64 and big.estimated_bytes <= parse_memory("1G")
    tight = plan_ivfpq(1_000_000, 512, parse_memory("330M"))
    assert tight.pq_m == 32 and tight.estimated_bytes <= parse_memory("330M") < big.estimated_bytes
    with pytest.raises(ValueError, match="do not fit a memory budget of 100 MiB"):
        plan_ivfpq(1_000_000, 512, parse_memory("100M"))
    assert parse_memory("1.5GB") == int(1.5 * 2**30) and parse_memory("800MiB") == 800 * 2**20
    with pytest.raises(ValueError, match="'lots'"):
        parse_memory("lots")


def test_parts_that_disagree_refuse_naming_them(tmp_path):
    rng = np.random.default_rng(0)
    _write_parts(tmp_path / "dims", rng.standard_normal((8, 16)).astype(np.float32), 4)
    write_part(tmp_path / "dims", 0, 2, 8, 12, rng.standard_normal((4, 8)), [{"id": 8 + i} for i in range(4)],
               [], "m", "float16")
    with pytest.raises(PartsError, match=r"disagree in dim .*16: part-00000-00000, part-00001-00001.*8: part-00000-00002"):
        build_from_parts(tmp_path / "dims", kind="flat")
    _write_parts(tmp_path / "models", rng.standard_normal((8, 16)).astype(np.float32), 4)
    write_part(tmp_path / "models", 0, 2, 8, 12, rng.standard_normal((4, 16)), [{"id": 8 + i} for i in range(4)],
               [], "other", "float16")
    with pytest.raises(PartsError, match=r"disagree in model_id .*'other': part-00000-00002"):
        build_from_parts(tmp_path / "models", kind="flat")


def test_unfinished_nan_and_duplicate_parts_are_refused(tmp_path, checkpoint, photos):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    x[5, 3] = np.nan
    _write_parts(tmp_path / "nan", x, 4)
    with pytest.raises(ValueError, match="NaN"):
        build_from_parts(tmp_path / "nan", kind="flat")
    _write_parts(tmp_path / "dup", rng.standard_normal((8, 16)).astype(np.float32), 4)
    write_part(tmp_path / "dup", 0, 2, 8, 12, rng.standard_normal((4, 16)), [{"id": 3 + i} for i in range(4)],
               [], "m", "float16")
    with pytest.raises(ValueError, match="duplicates|already in the index"):
        build_from_parts(tmp_path / "dup", kind="flat")
    out = tmp_path / "unfinished"
    _embed(checkpoint, photos, out)
    for path in out.glob("part-00000-00001.*"):
        path.unlink()
    with pytest.raises(PartsError, match=r"1 of 3 parts are not finished \(parts \[1\]\)"):
        build_from_parts(out, kind="flat")
    with pytest.raises(ValueError, match="keeps every vector"):
        Index.build_from_parts(tmp_path / "dup", kind="flat", memory_budget=100)
