"""IVF-PQ search quality: default nprobe from nlist, exact re-ranking of the PQ shortlist against the
float vectors of the ``EMB/`` parts (memory-mapped), kept through save/load/mmap and refused clearly."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

import retrieval.rerank as rr
from retrieval.backends import IndexParams, default_nprobe
from retrieval.index import Index
from retrieval.parts import write_part
from retrieval.rerank import PartsVectors, VectorSourceError


def _lowrank(n, dim=32, seed=0):
    """Unit vectors on a few decaying latent factors: close neighbours that PQ codes confuse."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(123).standard_normal((8, dim)).astype(np.float32)
    z = rng.standard_normal((n, 8)).astype(np.float32) * np.linspace(1.0, 0.2, 8, dtype=np.float32)
    x = z @ basis + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(EMB folder, index built from 4 float16 parts, the stored vectors as float32, queries)."""
    root = tmp_path_factory.mktemp("rerank")
    x = _lowrank(4000)
    emb = root / "emb"
    emb.mkdir()
    for s, start in enumerate(range(0, len(x), 1000)):
        part = x[start:start + 1000]
        rows = [{"id": 10 + start + i, "path": f"{start + i}.png"} for i in range(len(part))]
        write_part(emb, 0, s, start, start + len(part), part, rows, [], "m", "float16")
    index = Index.build_from_parts(emb, kind="ivfpq", memory_budget="64M",
                                   params=IndexParams(ivf_nlist=32, pq_m=4))
    stored = x.astype(np.float16).astype(np.float32)
    queries = _lowrank(60, seed=7)
    return emb, index, stored, queries


def _truth(stored, queries, k):
    scores = queries @ stored.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order + 10, np.take_along_axis(scores, order, 1)


def _recall(got, want):
    return float(np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(got, want)]))


def test_default_nprobe_follows_nlist():
    assert [default_nprobe(n) for n in (8, 64, 512, 2048, 4096)] == [8, 16, 64, 256, 512]
    assert IndexParams().ivf_nprobe is None and IndexParams(ivf_nprobe=5).ivf_nprobe == 5
    with pytest.raises(ValueError, match="rerank_factor"):
        IndexParams(rerank_factor=-1)


def test_rerank_over_a_covering_shortlist_equals_brute_force(built):
    _, index, stored, queries = built
    want_ids, want_scores = _truth(stored, queries, 10)
    # every list visited and every item in the shortlist: the re-rank is an exact search
    ids, scores = index.search(queries, 10, rerank=len(stored), nprobe=32)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    # a shortlist of 100: wherever it holds the true top-10, the answer is the brute-force one
    short_ids, _ = index.search(queries, 100, rerank=0, nprobe=32)
    covered = np.array([set(w) <= set(s) for w, s in zip(want_ids, short_ids)])
    assert covered.sum() >= len(queries) // 2, covered.sum()
    ids, scores = index.search(queries, 10, rerank=100, nprobe=32)
    np.testing.assert_array_equal(ids[covered], want_ids[covered])
    np.testing.assert_allclose(scores[covered], want_scores[covered], rtol=0, atol=1e-5)


def test_recall_grows_with_the_shortlist(built):
    _, index, stored, queries = built
    want, _ = _truth(stored, queries, 10)
    recalls = [_recall(index.search(queries, 10, rerank=r, nprobe=8)[0], want) for r in (0, 10, 20, 40, 80, 160)]
    assert all(b >= a for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[0] == recalls[1]                 # re-ranking the PQ top-10 itself only reorders it
    assert recalls[-1] >= recalls[0] + 0.2, recalls  # PQ4 codes of 32-d vectors alone are rough
    # the default re-ranks rerank_factor * k
    default = index.search(queries, 10, nprobe=8)[0]
    np.testing.assert_array_equal(default, index.search(queries, 10, rerank=10 * index.params.rerank_factor,
                                                        nprobe=8)[0])


def test_rerank_blocks_bound_memory_and_keep_results(built, monkeypatch):
    _, index, _, queries = built
    whole = index.search(queries, 10, rerank=50)
    monkeypatch.setattr(rr, "GATHER_BUDGET", 50 * 32 * 3)    # three queries' shortlists at a time
    blocked = index.search(queries, 10, rerank=50)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])


@pytest.mark.parametrize("mmap", [False, True])
def test_saved_index_keeps_its_vectors_and_reranks_the_same(built, tmp_path, mmap):
    emb, index, _, queries = built
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx", mmap=mmap)
    assert loaded.vector_source is not None and loaded.vector_source.count == 4000
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_moved_parts_warn_by_default_raise_when_asked_and_reattach(built, tmp_path):
    emb, index, _, queries = built
    index.save(tmp_path / "idx")
    moved = tmp_path / "emb-moved"
    shutil.copytree(emb, moved)
    loaded = Index.load(tmp_path / "idx")
    loaded.vector_source.folder = tmp_path / "nowhere"           # as if EMB/ had been moved away
    with pytest.warns(UserWarning, match="PQ scores only"):
        ids, _ = loaded.search(queries, 10)
    np.testing.assert_array_equal(ids, index.search(queries, 10, rerank=0)[0])
    with pytest.raises(VectorSourceError, match="attach_vectors"):
        loaded.search(queries, 10, rerank=50)
    loaded.attach_vectors(moved)
    np.testing.assert_array_equal(loaded.search(queries, 10)[0], index.search(queries, 10)[0])
    (moved / "part-00000-00001.npy").write_bytes(b"not an npy file")
    with pytest.raises(VectorSourceError, match="part-00000-00001.npy"):
        loaded.attach_vectors(moved)


def test_changed_parts_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    write_part(folder, 0, 0, 0, 3, np.ones((3, 4), np.float32), [{"id": i} for i in range(3)], [], "m", "float32")
    source = PartsVectors(folder, [("part-00000-00000", 5)])
    with pytest.raises(VectorSourceError, match=r"part-00000-00000\.npy holds float32 \(3, 4\)"):
        source.open(4)


def test_bad_rerank_and_nprobe_values_are_refused(built):
    _, index, _, queries = built
    for bad, match in ((5, "must be >= k=10"), (-1, "rerank must be"), (True, "rerank must be"), (2.0, "rerank must be")):
        with pytest.raises(ValueError, match=match):
            index.search(queries, 10, rerank=bad)
    with pytest.raises(ValueError, match="nprobe"):
        index.search(queries, 10, nprobe=0)
    flat = Index.build(queries, kind="flat")
    with pytest.raises(ValueError, match="nprobe .* 'flat'"):
        flat.search(queries, 3, nprobe=4)
    np.testing.assert_array_equal(flat.search(queries, 3, rerank=30)[0], flat.search(queries, 3)[0])  # exact already
    plain = Index.build(_lowrank(600), kind="ivfpq", params=IndexParams(ivf_nlist=8, pq_m=4, pq_nbits=6))
    with pytest.raises(ValueError, match="build_from_parts"):
        plain.search(queries, 10, rerank=50)


def test_adding_outside_the_parts_stops_reranking_with_a_warning(built, tmp_path):
    _, index, _, queries = built
    index.save(tmp_path / "idx")
    copy = Index.load(tmp_path / "idx")
    with pytest.warns(UserWarning, match="no longer re-ranks"):
        copy.add(_lowrank(5, seed=3), ids=[90_000 + i for i in range(5)])
    assert copy.vector_source is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = copy.search(queries, 10)
    assert ids.shape == (60, 10) and (ids >= 0).all()
