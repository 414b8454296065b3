"""retrieval.Index: exact and approximate search, ids, metadata, removal, atomic save, checked load."""
from __future__ import annotations

import json

import numpy as np
import pytest

import retrieval
from retrieval import backends
from retrieval import index as index_mod
from retrieval.backends import IndexParams
from retrieval.index import Index, IndexMismatchError


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """FAISS's OpenMP barriers crawl on an oversubscribed CPU; one thread keeps the tests quick."""
    import faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(x, q, k):
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def _recall(got, want):
    return np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)])


def test_flat_matches_brute_force_across_chunks(monkeypatch):
    monkeypatch.setattr(backends, "ROW_CHUNK", 37)
    monkeypatch.setattr(backends, "QUERY_CHUNK", 5)
    monkeypatch.setattr(backends, "SCORE_BUDGET", 64)
    rng = np.random.default_rng(0)
    x, q = _unit(rng, 300, 16), _unit(rng, 12, 16)
    idx = retrieval.Index.build(x, kind="flat")
    ids, scores = idx.search(q, k=7)
    want_ids, want_scores = _exact(x, q, 7)
    assert ids.shape == (12, 7) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_k_larger_than_index_pads_with_minus_one():
    idx = Index.build(np.eye(3, dtype=np.float32), kind="flat")
    ids, scores = idx.search(np.array([[0.0, 1.0, 0.0]], np.float32), k=5)
    assert ids[0, 0] == 1 and scores[0, 0] == pytest.approx(1.0)
    assert ids[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_ids_metadata_and_removal_flat():
    x = np.eye(4, dtype=np.float32)
    idx = Index.build(x, metadata=[{"path": f"{i}.jpg"} for i in range(4)], ids=[10, 11, 12, 13], kind="flat")
    assert len(idx) == 4 and 12 in idx and idx.metadata(12) == {"path": "2.jpg"}
    assert idx.remove([11, 12]) == 2
    assert len(idx) == 2 and idx.ids.tolist() == [10, 13]
    ids, _ = idx.search(x, k=1)
    assert ids[:, 0].tolist() == [10, 10, 13, 13] or ids[0, 0] == 10  # removed ids never come back
    assert 11 not in ids and 12 not in ids
    assert idx.metadata(13) == {"path": "3.jpg"}
    new = idx.add(np.ones((1, 4), np.float32) / 2, metadata=[{"path": "new.jpg"}])
    assert new.tolist() == [14]
    with pytest.raises(ValueError, match="not in the index"):
        idx.remove([99])
    assert idx.remove([99], missing_ok=True) == 0


def test_bad_input_is_refused():
    idx = Index(4, "flat")
    with pytest.raises(ValueError, match="width 3"):
        idx.add(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        idx.add(np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="metadata"):
        idx.add(np.zeros((2, 4), np.float32), metadata=[{}])
    with pytest.raises(TypeError, match="JSON"):
        idx.add(np.zeros((1, 4), np.float32), metadata=[{"x": object()}])
    idx.add(np.eye(4, dtype=np.float32)[:2], ids=[5, 6])
    with pytest.raises(ValueError, match="already"):
        idx.add(np.eye(4, dtype=np.float32)[:1], ids=[5])
    with pytest.raises(ValueError, match="k must be"):
        idx.search(np.zeros((1, 4), np.float32), k=0)
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        Index.build(np.eye(4, dtype=np.float32), kind="annoy")


def test_hnsw_recall_removal_and_compaction():
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 2000, 24), _unit(rng, 50, 24)
    idx = Index.build(x, kind="hnsw", metadata=[{"i": i} for i in range(2000)])
    ids, scores = idx.search(q, k=10)
    want, want_s = _exact(x, q, 10)
    assert _recall(ids, want) >= 0.95
    # scores are real inner products of the returned ids
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-4)
    top1 = set(want[:, 0].tolist())
    idx.remove(list(top1))            # few removals: masked, not compacted
    assert idx._store.ntotal == 2000
    ids2, _ = idx.search(q, k=10)
    assert not (set(ids2.ravel().tolist()) & top1)
    idx.remove(range(1000, 1600), missing_ok=True)  # > 25% dead -> rebuilt
    assert idx._store.ntotal == len(idx) == 2000 - len(top1 | set(range(1000, 1600)))
    ids3, _ = idx.search(q, k=10)
    alive = np.array(sorted(set(range(2000)) - top1 - set(range(1000, 1600))))
    want3 = alive[_exact(x[alive], q, 10)[0]]
    assert _recall(ids3, want3) >= 0.95
    assert idx.metadata(int(alive[-1])) == {"i": int(alive[-1])}


def test_ivfpq_search_and_removal():
    rng = np.random.default_rng(2)
    x = _unit(rng, 2000, 16)
    params = IndexParams(ivf_nlist=16, ivf_nprobe=16, pq_m=8, pq_nbits=5)
    idx = Index.build(x, kind="ivfpq", params=params)
    q = _unit(rng, 40, 16)
    ids, scores = idx.search(q, k=10)
    assert (ids >= 0).all()
    # PQ is lossy: the exact nearest item should still usually be in the top 10,
    # and the returned items' true scores are close to the exact top 10's.
    want, want_s = _exact(x, q, 10)
    assert np.mean([w in row for w, row in zip(want[:, 0], ids)]) >= 0.8
    true_s = np.einsum("qd,qkd->qk", q, x[ids])
    assert np.abs(true_s.mean(1) - want_s.mean(1)).max() < 0.1
    idx.remove(ids[:, 0].tolist(), missing_ok=True)
    ids2, _ = idx.search(q, k=10)
    assert not (set(ids2.ravel().tolist()) & set(ids[:, 0].tolist()))
    with pytest.raises(ValueError, match="at least"):
        Index.build(x[:20], kind="ivfpq", params=params)


def test_auto_kind_switches_at_threshold(monkeypatch):
    monkeypatch.setattr(index_mod, "AUTO_APPROX_THRESHOLD", 100)
    rng = np.random.default_rng(3)
    assert Index.build(_unit(rng, 99, 8)).kind == "flat"
    assert Index.build(_unit(rng, 100, 8)).kind == "hnsw"


def test_convert_flat_to_hnsw_keeps_ids_and_metadata():
    rng = np.random.default_rng(4)
    x = _unit(rng, 200, 8)
    flat = Index.build(x, kind="flat", ids=np.arange(200) * 2, metadata=[{"n": i} for i in range(200)])
    hnsw = flat.convert("hnsw")
    assert hnsw.kind == "hnsw" and hnsw.ids.tolist() == flat.ids.tolist()
    a, _ = flat.search(x[:10], k=5)
    b, _ = hnsw.search(x[:10], k=5)
    assert _recall(b, a) >= 0.95 and hnsw.metadata(8) == {"n": 4}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_roundtrip(tmp_path, kind):
    rng = np.random.default_rng(5)
    x = _unit(rng, 600, 16)
    params = IndexParams(ivf_nlist=8, pq_m=4, pq_nbits=4)
    idx = Index.build(x, kind=kind, model_id="m1", params=params, info={"root": "/photos"},
                      metadata=[{"path": f"p{i}.jpg", "caption": "é"} for i in range(600)])
    idx.remove([3, 4, 5])
    before = idx.search(x[:20], k=8)
    out = idx.save(tmp_path / "idx")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "ids.npy", "metadata.jsonl", "metadata.offsets.npy",
         "vectors.npy" if kind == "flat" else "index.faiss"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 597 and manifest["embedding_dim"] == 16 and manifest["model_id"] == "m1"
    loaded = Index.load(out, model_id="m1", embedding_dim=16)
    after = loaded.search(x[:20], k=8)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], atol=1e-6)
    assert len(loaded) == 597 and loaded.metadata(7) == {"path": "p7.jpg", "caption": "é"}
    assert loaded.info == {"root": "/photos"} and loaded.kind == kind
    assert loaded.add(x[:1]).tolist() == [600]  # ids keep counting after a reload


def test_load_refuses_mismatch_and_damage(tmp_path):
    idx = Index.build(np.eye(4, dtype=np.float32), kind="flat", model_id="open_clip:ViT-B-32")
    out = idx.save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="built with model 'open_clip:ViT-B-32'"):
        Index.load(out, model_id="ernie-vl:tiny")
    with pytest.raises(IndexMismatchError, match="4-d"):
        Index.load(out, embedding_dim=512)
    vec = out / "vectors.npy"
    vec.write_bytes(vec.read_bytes()[:-8])
    with pytest.raises(IndexMismatchError, match="truncated"):
        Index.load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="version 99"):
        Index.load(out)
    with pytest.raises(IndexMismatchError, match="no manifest"):
        Index.load(tmp_path / "nowhere")


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    target = tmp_path / "idx"
    Index.build(np.eye(3, dtype=np.float32), kind="flat", model_id="v1").save(target)
    Index.build(np.eye(3, dtype=np.float32)[:2], kind="flat", model_id="v2").save(target)
    assert Index.load(target).model_id == "v2" and len(Index.load(target)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp / backup folders left

    def crash(self, folder):
        (folder / "vectors.npy").write_bytes(b"half")
        raise RuntimeError("disk died")

    monkeypatch.setattr(backends.FlatStore, "save", crash)
    with pytest.raises(RuntimeError, match="disk died"):
        Index.build(np.eye(3, dtype=np.float32), kind="flat", model_id="v3").save(target)
    assert Index.load(target).model_id == "v2"  # the old index is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not an index folder"):
        Index.build(np.eye(3, dtype=np.float32)).save(tmp_path / "notes")


def test_flat_column_layout_loads_row_major_files_and_adds(tmp_path):
    """The flat store keeps (D, N) columns; a vectors.npy written row-major (older indexes) loads to
    the same results, and add / remove / reconstruct keep rows and ids aligned."""
    rng = np.random.default_rng(3)
    x, q = _unit(rng, 50, 8), _unit(rng, 4, 8)
    idx = Index.build(x[:30], kind="flat")
    idx.add(x[30:])
    np.testing.assert_array_equal(idx._store.reconstruct(np.array([0, 31, 49])), x[[0, 31, 49]])
    want_ids, want_scores = _exact(x, q, 5)
    for queries in (q, q[:1]):   # a single query takes MKL's gemv path
        ids, scores = idx.search(queries, 5)
        np.testing.assert_array_equal(ids, want_ids[: len(queries)])
        np.testing.assert_allclose(scores, want_scores[: len(queries)], atol=1e-5)
    folder = idx.save(tmp_path / "idx")
    assert np.load(folder / "vectors.npy").shape == (50, 8)
    np.save(folder / "vectors.npy", np.ascontiguousarray(x))          # the row-major layout of older files
    loaded = Index.load(folder)
    np.testing.assert_array_equal(loaded.search(q, 5)[0], want_ids)
    loaded.remove([int(want_ids[0, 0])])
    ids, _ = loaded.search(q[:1], 4)
    np.testing.assert_array_equal(ids[0], want_ids[0, 1:5])
