"""`Index.load(mmap=True)` and `ShardedIndex`: the same results as the in-memory / single index."""
from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.index import Index, IndexMismatchError
from retrieval.search import hits_from_arrays
from retrieval.sharded import ShardedIndex, merge_topk


def _unit(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_mmap_load_searches_like_a_full_load(tmp_path, kind):
    x = _unit(3000, 32, 0)
    index = Index.build(x, metadata=[{"n": i} for i in range(len(x))], kind=kind)
    index.remove([5, 6])
    index.save(tmp_path / "idx")
    full, mapped = Index.load(tmp_path / "idx"), Index.load(tmp_path / "idx", mmap=True)
    q = _unit(50, 32, 1)
    ids_a, sc_a = full.search(q, 10)
    ids_b, sc_b = mapped.search(q, 10)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(sc_a, sc_b)
    assert mapped.read_only and len(mapped) == 2998 and mapped.metadata(7) == {"n": 7}
    if kind == "flat":
        assert isinstance(mapped._store.x.base, np.memmap) or isinstance(mapped._store.x, np.memmap)
    with pytest.raises(ValueError, match="mmap=True"):
        mapped.add(x[:1])
    with pytest.raises(ValueError, match="mmap=True"):
        mapped.remove([1])


def _save_with_nan(tmp_path, name, old_format, nan_row=None, n=300):
    """A flat index folder; ``old_format`` drops the manifest's vector record (as written before it existed),
    ``nan_row`` writes NaN into that stored vector afterwards (same file size: the manifest still matches)."""
    folder = tmp_path / name
    Index.build(_unit(n, 8, 0), ids=np.arange(n) + 1000, kind="flat").save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["vectors"] == {"nonfinite": 0}  # the write-time check
    if old_format:
        del manifest["vectors"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    if nan_row is not None:
        vecs = np.load(folder / "vectors.npy")
        vecs[nan_row, 2] = np.nan
        np.save(folder / "vectors.npy", vecs)
    return folder


@pytest.fixture
def vector_checks(monkeypatch):
    """Counts full passes over the stored vectors (FlatStore.nonfinite_slots)."""
    from retrieval.backends import FlatStore

    calls = []
    real = FlatStore.nonfinite_slots
    monkeypatch.setattr(FlatStore, "nonfinite_slots", lambda self: calls.append(self.ntotal) or real(self))
    return calls


@pytest.mark.parametrize("old_format", [False, True])
def test_mmap_flat_open_reads_no_vectors_and_searches_check_them(tmp_path, vector_checks, old_format):
    folder = _save_with_nan(tmp_path, "idx", old_format)
    vector_checks.clear()
    mapped = Index.load(folder, mmap=True)
    assert vector_checks == []                         # nothing paged in at open, with or without the record
    q = _unit(4, 8, 1)
    for _ in range(3):
        ids, scores = mapped.search(q, 5)
        want_ids, want_scores = Index.load(folder).search(q, 5)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)
    # the full load checks at open (1 pass per search above); the mapped one once, at its first search, only
    # when the file lacks the record
    assert vector_checks == [300] * (3 + int(old_format)), vector_checks


@pytest.mark.parametrize("old_format", [False, True])
def test_mmap_flat_search_refuses_a_nan_vector_naming_the_file(tmp_path, old_format):
    folder = _save_with_nan(tmp_path, "idx", old_format, nan_row=3)
    mapped = Index.load(folder, mmap=True)
    for _ in range(2):  # and keeps refusing
        with pytest.raises(IndexMismatchError, match=r"vectors\.npy is damaged: 1 vectors hold NaN or inf "
                                                     r"\(ids \[1003\]\)"):
            mapped.search(_unit(2, 8, 1), 5)
    with pytest.raises(IndexMismatchError, match=r"idx is damaged: 1 vectors hold NaN or inf \(ids \[1003\]\)"):
        Index.load(folder)                            # a full load refuses at open
    with pytest.raises(IndexMismatchError, match="NaN or inf"):
        ShardedIndex.load([folder], mmap=True).search(_unit(1, 8, 2), 3)


def test_the_manifest_records_nonfinite_vectors_and_a_mapped_search_refuses_them(tmp_path):
    index = Index.build(_unit(100, 8, 0), kind="flat")
    x = _unit(1, 8, 3)
    x[0, 5] = np.inf
    index._store.add(x)  # past add()'s own check, as a foreign tool could have written it
    index._items.append(np.array([100]), [{}])
    index._next_id = 101
    index.save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["vectors"] == {"nonfinite": 1}
    mapped = Index.load(tmp_path / "idx", mmap=True)  # a record other than 0: checked in full at the first search
    with pytest.raises(IndexMismatchError, match=r"vectors\.npy is damaged: 1 vectors hold NaN or inf \(ids \[100\]\)"):
        mapped.search(_unit(1, 8, 4), 3)


def _split(x, shards, kind="flat"):
    ids = np.random.default_rng(3).permutation(len(x)) * 3 + 7     # sparse, shuffled ids
    pieces = np.array_split(np.arange(len(x)), shards)
    return ids, [Index.build(x[p], ids=ids[p], metadata=[{"row": int(r)} for r in p], kind=kind, model_id="m")
                 for p in pieces]


@pytest.mark.parametrize("mmap", [False, True])
def test_sharded_flat_equals_one_flat_index_over_the_union(tmp_path, mmap):
    x = _unit(2500, 24, 0)
    ids, shards = _split(x, 3)
    folders = []
    for i, shard in enumerate(shards):
        folders.append(shard.save(tmp_path / f"shard{i}"))
    union = Index.build(x, ids=ids, metadata=[{"row": r} for r in range(len(x))], kind="flat", model_id="m")
    sharded = ShardedIndex.load(folders, model_id="m", mmap=mmap)
    assert len(sharded) == len(union) == 2500
    q = _unit(64, 24, 5)
    for k in (1, 10, 100):
        got_ids, got_scores = sharded.search(q, k)
        want_ids, want_scores = union.search(q, k)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-6)
    hits = hits_from_arrays(sharded, *sharded.search(q[:1], 3))
    assert hits[0][0].metadata == union.metadata(hits[0][0].id)
    sharded.close()


def test_merge_pads_when_k_exceeds_the_union():
    small = [Index.build(_unit(3, 8, s), ids=[10 * s + i for i in range(3)], kind="flat") for s in range(2)]
    ids, scores = ShardedIndex(small).search(_unit(2, 8, 9), 10)
    assert (ids[:, :6] >= 0).all() and (ids[:, 6:] == -1).all() and np.isinf(scores[:, 6:]).all()
    assert (np.diff(scores[:, :6], axis=1) <= 0).all()
    ids, _ = merge_topk([np.array([[1, -1]]), np.array([[2, 3]])], [np.array([[0.5, 9.0]]), np.array([[0.7, 0.1]])], 3)
    assert ids.tolist() == [[2, 1, 3]]   # a missing result (-1) never wins, whatever its score


def test_sharded_refuses_overlapping_ids_and_mixed_shards():
    a = Index.build(_unit(5, 8, 0), ids=range(5), kind="flat", model_id="m")
    b = Index.build(_unit(5, 8, 1), ids=range(4, 9), kind="flat", model_id="m")
    with pytest.raises(IndexMismatchError, match="id 4 is in shard 0 and shard 1"):
        ShardedIndex([a, b])
    c = Index.build(_unit(5, 16, 1), ids=range(10, 15), kind="flat", model_id="m")
    with pytest.raises(IndexMismatchError, match="disagree in dim"):
        ShardedIndex([a, c])
    d = Index.build(_unit(5, 8, 1), ids=range(10, 15), kind="flat", model_id="other")
    with pytest.raises(IndexMismatchError, match="disagree in model_id"):
        ShardedIndex([a, d])
    with pytest.raises(ValueError, match="at least one shard"):
        ShardedIndex([])


def test_sharded_ids_are_looked_up_in_the_shards_arrays(tmp_path, monkeypatch):
    import retrieval.items as items_module

    evens = Index.build(_unit(50, 8, 0), ids=range(0, 100, 2), metadata=[{"n": i} for i in range(50)], model_id="m")
    odds = Index.build(_unit(50, 8, 1), ids=range(1, 100, 2), metadata=[{"n": -i} for i in range(50)], model_id="m")
    sharded = ShardedIndex([evens, odds])  # ranges overlap, ids do not: compared on the sorted arrays
    assert not hasattr(sharded, "_ids") and len(sharded) == 100
    assert 98 in sharded and 99 in sharded and 100 not in sharded and -1 not in sharded
    assert sharded.metadata(98) == {"n": 49} and sharded.metadata(7) == {"n": -3}
    with pytest.raises(ValueError, match="id 100 is not in any shard"):
        sharded.metadata(100)
    clash = Index.build(_unit(3, 8, 2), ids=[101, 57, 300], kind="flat", model_id="m")
    with pytest.raises(IndexMismatchError, match="id 57 is in shard 1 and shard 2"):
        ShardedIndex([evens, odds, clash])
    # mapped shards with disjoint ranges: opening them as one reads none of their ids
    folders = [Index.build(_unit(40, 8, s), ids=range(1000 * s, 1000 * s + 40), model_id="m",
                           metadata=[{"s": s}] * 40).save(tmp_path / f"s{s}") for s in range(3)]
    reads = []
    real = items_module._strictly_increasing
    monkeypatch.setattr(items_module, "_strictly_increasing", lambda ids, *a: reads.append(len(ids)) or real(ids, *a))
    mapped = ShardedIndex.load(folders, model_id="m", mmap=True)
    assert reads == [] and len(mapped) == 120 and [r for r in mapped._ranges] == [(0, 39), (1000, 1039), (2000, 2039)]
    assert mapped.metadata(2005) == {"s": 2} and reads == [40]  # only the shard that holds it
    assert 1500 not in mapped and reads == [40]
    sharded.close()
    mapped.close()


def _hnsw_with_bad_rows(tmp_path, rows, n=400, dim=16):
    """An HNSW index saved with non-finite values written into the stored vectors ``rows`` (past the checks,
    as a foreign tool could have written it); ids are 1000 + slot."""
    from retrieval import backends

    x = _unit(n, dim, 4)
    for r in rows:
        x[r, 1] = np.nan if r % 2 else np.inf
    store = backends.HNSWStore(dim, backends.IndexParams())
    store.add(x)
    index = Index.build(_unit(1, dim, 5), ids=[0], kind="hnsw")
    index._store = store
    index._items = type(index._items)()
    index._items.append(np.arange(1000, 1000 + n), [{} for _ in range(n)])
    index._next_id = 1000 + n
    index.save(tmp_path / "idx")
    return tmp_path / "idx"


def test_mmap_hnsw_maps_the_file_and_checks_every_vector_from_it(tmp_path, monkeypatch):
    import faiss

    from retrieval import backends

    folder = _hnsw_with_bad_rows(tmp_path, [])
    flags = []
    read_index = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda path, f=0: flags.append(f) or read_index(path, f))
    mapped = Index.load(folder, mmap=True)
    assert flags[-1] & faiss.IO_FLAG_MMAP_IFC and flags[-1] & faiss.IO_FLAG_READ_ONLY  # the codes are mapped
    store = mapped._store
    # the check reads the vectors from the file, not through the mapping: FAISS's layout is recognised
    from_file = backends._file_tail_nonfinite(store.mapped_file, store.index)
    assert from_file is not None and len(from_file) == 0
    ids, scores = mapped.search(_unit(5, 16, 6), 4)
    full_ids, full_scores = Index.load(folder).search(_unit(5, 16, 6), 4)
    np.testing.assert_array_equal(ids, full_ids)
    np.testing.assert_array_equal(scores, full_scores)
    # a file that does not end as FAISS writes an HNSW index: None (the caller falls back to the mapping)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\1" * (store.index.ntotal * 16 * 4 + 64))
    assert backends._file_tail_nonfinite(other, store.index) is None


@pytest.mark.parametrize("rows", [[0], [7, 399], [1, 2, 3]], ids=["first", "middle+last", "three"])
def test_mmap_hnsw_load_refuses_non_finite_vectors_naming_them(tmp_path, rows):
    folder = _hnsw_with_bad_rows(tmp_path, rows)
    ids = ", ".join(str(1000 + r) for r in rows)
    for mmap in (True, False):
        with pytest.raises(IndexMismatchError, match=rf"{len(rows)} vectors hold NaN or inf \(ids \[{ids}\]\)"):
            Index.load(folder, mmap=mmap)
