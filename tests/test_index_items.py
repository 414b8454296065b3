"""Item ids and metadata kept compact (one byte buffer + offsets) and opened lazily with ``mmap=True``:
the same ids, names and scores as a full load; damaged files refused on every path."""
from __future__ import annotations

import json
import mmap

import numpy as np
import pytest

from retrieval.index import Index, IndexMismatchError
from retrieval.items import ItemTable, _line_offsets

LATIN1_NAME = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")   # a file name that is not UTF-8


def _unit(n, dim, seed):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _metas(n):
    return [{"path": LATIN1_NAME if i == 3 else f"img/{i:05d}.jpg", "caption": f"photo n° {i} 猫"} for i in range(n)]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_mmap_and_full_load_give_the_same_ids_names_and_scores(tmp_path, kind):
    x = _unit(2000, 16, 0)
    ids = np.arange(2000) * 7 + 3
    index = Index.build(x, metadata=_metas(2000), ids=ids, kind=kind)
    index.remove([ids[10], ids[11]])
    index.save(tmp_path / "idx")
    full, lazy = Index.load(tmp_path / "idx"), Index.load(tmp_path / "idx", mmap=True)
    assert isinstance(lazy._items._buf, mmap.mmap) and isinstance(lazy._items.slot_ids, np.memmap)
    assert isinstance(full._items._buf, bytes)                  # one buffer, not a dict per item
    q = _unit(30, 16, 1)
    (ids_a, sc_a), (ids_b, sc_b) = full.search(q, 10), lazy.search(q, 10)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(sc_a, sc_b)
    names_a = [[full.metadata(i) for i in row] for row in ids_a]
    assert names_a == [[lazy.metadata(i) for i in row] for row in ids_b]
    assert lazy.metadata(ids[3]) == {"path": LATIN1_NAME, "caption": "photo n° 3 猫"}
    assert len(full) == len(lazy) == 1998 and ids[10] not in lazy and ids[12] in lazy
    assert list(full.items()) == list(lazy.items()) == [(int(i), m) for i, m in zip(ids, _metas(2000))
                                                        if i not in (ids[10], ids[11])]
    with pytest.raises(ValueError, match="not in the index"):
        lazy.metadata(ids[10])
    rows = (tmp_path / "idx" / "metadata.jsonl").read_bytes().splitlines()
    assert json.loads(rows[3]) == {"path": LATIN1_NAME, "caption": "photo n° 3 猫"}
    if kind != "flat":                                          # flat compacts at once; the others keep the slots
        assert rows[10] == rows[11] == b"null" and len(rows) == 2000


def test_mmap_reads_a_metadata_row_only_when_asked(tmp_path):
    x = _unit(50, 8, 0)
    Index.build(x, metadata=[{"n": i} for i in range(50)], kind="flat").save(tmp_path / "idx")
    path = tmp_path / "idx" / "metadata.jsonl"
    data = path.read_bytes().replace(b'{"n": 7}', b'["n", 7]')       # same size: only the content is wrong
    path.write_bytes(data)
    with pytest.raises(IndexMismatchError, match=r"metadata rows \[7\] are not JSON objects"):
        Index.load(tmp_path / "idx")
    lazy = Index.load(tmp_path / "idx", mmap=True)                    # opens without reading the rows
    assert lazy.metadata(8) == {"n": 8}
    with pytest.raises(IndexMismatchError, match="metadata row 7 is not a JSON object"):
        lazy.metadata(7)


@pytest.mark.parametrize("mmap_load", [False, True])
def test_damaged_ids_and_offsets_are_refused(tmp_path, mmap_load):
    Index.build(_unit(6, 8, 0), metadata=[{"n": i} for i in range(6)]).save(tmp_path / "idx")
    np.save(tmp_path / "idx" / "ids.npy", np.array([0, 1, 2, 2, 4, 5], np.int64))
    if mmap_load:  # the open trusts the manifest's write-time record; the first lookup by id reads and refuses
        lazy = Index.load(tmp_path / "idx", mmap=True)
        for _ in range(2):  # and keeps refusing
            with pytest.raises(IndexMismatchError, match=r"duplicate ids \[2\]"):
                lazy.metadata(4)
        manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
        del manifest["ids"]  # an index written without the record: the mapped open checks the ids itself
        (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match=r"duplicate ids \[2\]"):
        Index.load(tmp_path / "idx", mmap=mmap_load)
    np.save(tmp_path / "idx" / "ids.npy", np.arange(6, dtype=np.int64))
    offsets = np.load(tmp_path / "idx" / "metadata.offsets.npy")
    np.save(tmp_path / "idx" / "metadata.offsets.npy", offsets - 1)
    with pytest.raises(IndexMismatchError, match="metadata.offsets.npy does not match"):
        Index.load(tmp_path / "idx", mmap=mmap_load)


def test_an_index_saved_without_the_offsets_file_still_loads(tmp_path):
    Index.build(_unit(20, 8, 0), metadata=[{"n": i} for i in range(20)]).save(tmp_path / "idx")
    (tmp_path / "idx" / "metadata.offsets.npy").unlink()
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    del manifest["files"]["metadata.offsets.npy"]
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    for mmap_load in (False, True):
        index = Index.load(tmp_path / "idx", mmap=mmap_load)
        assert [index.metadata(i) for i in (0, 19)] == [{"n": 0}, {"n": 19}]


def test_item_table_compacts_and_finds_ids():
    table = ItemTable()
    table.append(np.array([5, 9, 2]), [{"a": 1}, {"b": "é"}, {}])
    table.append(np.array([40]), [{"c": [1, 2]}])
    np.testing.assert_array_equal(table.slots_of(np.array([9, 40, 3, -1])), [1, 3, -1, -1])
    table.kill(np.array([1]))
    table.compact(table.slot_ids >= 0)
    np.testing.assert_array_equal(table.slot_ids, [5, 2, 40])
    assert [table.row(s) for s in range(3)] == [{"a": 1}, {}, {"c": [1, 2]}] and table.alive == 3
    np.testing.assert_array_equal(_line_offsets(b'{}\n{"a": 1}\n[]'), [0, 3, 12, 14])


def test_increasing_ids_are_looked_up_in_place_without_a_sorted_copy(tmp_path):
    ids = np.arange(300) * 5 + 2
    Index.build(_unit(300, 8, 0), ids=ids, metadata=[{"n": int(i)} for i in ids], kind="flat").save(tmp_path / "a")
    lazy = Index.load(tmp_path / "a", mmap=True)
    assert lazy.metadata(ids[123]) == {"n": int(ids[123])} and ids[123] + 1 not in lazy
    assert lazy._items._order is None and lazy._items._sorted is lazy._items.slot_ids   # the memory map itself
    shuffled = ids[np.random.default_rng(0).permutation(300)]
    Index.build(_unit(300, 8, 0), ids=shuffled, kind="flat").save(tmp_path / "b")
    other = Index.load(tmp_path / "b", mmap=True)
    np.testing.assert_array_equal(other._items.slots_of(shuffled[:50]), np.arange(50))
    assert other._items._order is not None


def test_mapped_open_reads_no_ids_when_the_manifest_holds_their_check(tmp_path, monkeypatch):
    import retrieval.items as items_module

    index = Index.build(_unit(50, 8, 0), metadata=[{"n": i} for i in range(50)], ids=np.arange(50) * 3)
    index.remove([6, 9])
    index.save(tmp_path / "idx")
    record = json.loads((tmp_path / "idx" / "manifest.json").read_text())["ids"]
    assert record == {"alive": 48, "min_id": 0, "max_id": 147, "unique": True}
    reads = []
    real = items_module._strictly_increasing
    monkeypatch.setattr(items_module, "_strictly_increasing", lambda ids, *a: reads.append(len(ids)) or real(ids, *a))
    lazy = Index.load(tmp_path / "idx", mmap=True)
    assert reads == [] and len(lazy) == 48 and isinstance(lazy._items.slot_ids, np.memmap)
    assert lazy.metadata(147) == {"n": 49} and reads == [48]  # the first lookup reads and checks them, once
    assert 6 not in lazy and 3 in lazy and reads == [48]
    Index.load(tmp_path / "idx")  # a full load checks at open
    assert reads == [48, 48]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["next_id"] = 100  # below the recorded largest id: refused without reading the ids
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="next_id 100 is not above the largest id 147"):
        Index.load(tmp_path / "idx", mmap=True)


class _WatchedIds(np.ndarray):
    """Ids that record the size of every ufunc (comparison, sum, ...) run over them."""

    sizes: list = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _WatchedIds.sizes.extend(x.size for x in inputs if isinstance(x, _WatchedIds))
        plain = [np.asarray(x) if isinstance(x, _WatchedIds) else x for x in inputs]
        return getattr(ufunc, method)(*plain, **kwargs)


@pytest.mark.parametrize("removed", [[], [4, 17, 300]])
def test_hnsw_search_of_a_mapped_index_reads_the_ids_at_most_once(tmp_path, monkeypatch, removed):
    # the removed-slot mask is known to be empty from the count, else built at the first search and kept
    n = 400
    index = Index.build(_unit(n, 16, 0), metadata=[{"n": i} for i in range(n)], kind="hnsw")
    index.remove(removed)
    index.save(tmp_path / "idx")
    full, lazy = Index.load(tmp_path / "idx"), Index.load(tmp_path / "idx", mmap=True)
    monkeypatch.setattr(_WatchedIds, "sizes", [])
    lazy._items.slot_ids = lazy._items.slot_ids.view(_WatchedIds)
    q = _unit(6, 16, 1)
    for _ in range(3):
        ids, scores = lazy.search(q, 10)
        want_ids, want_scores = full.search(q, 10)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)
        np.testing.assert_array_equal(ids, index.search(q, 10)[0])
        assert not np.isin(ids, removed).any()
    full_reads = [s for s in _WatchedIds.sizes if s == n]
    assert len(full_reads) == (1 if removed else 0), _WatchedIds.sizes


def test_a_mapped_open_refuses_ids_whose_live_count_differs_from_the_manifest_at_the_first_lookup(tmp_path):
    # the count the search's removed-slot mask relies on came from the manifest: the id check confirms it
    Index.build(_unit(6, 8, 0), metadata=[{"n": i} for i in range(6)], kind="hnsw").save(tmp_path / "idx")
    np.save(tmp_path / "idx" / "ids.npy", np.array([0, 1, -1, 3, 4, 5], np.int64))
    lazy = Index.load(tmp_path / "idx", mmap=True)
    with pytest.raises(IndexMismatchError, match="5 live ids, the manifest records 6"):
        lazy.metadata(4)
