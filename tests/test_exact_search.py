"""The two-stage exact search (bf16 candidates, fp32 rescoring) returns the fp32 top-k.

Checked against float64 ground truth on adversarial data: near-ties below bf16's resolution, exact
duplicates, un-normalised vectors, huge norms, k near and above N; and the error bound it rests on,
on random and low-rank data.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from retrieval import exact
from retrieval.backends import FlatStore, IndexParams
from retrieval.index import Index

DIM = 64


def _accurate_bf16() -> bool:
    ok, why = exact.probe_bf16(torch.get_num_threads())
    return ok or why.startswith("bf16 product only")  # slow bf16 is still exact bf16


needs_bf16 = pytest.mark.skipif(not _accurate_bf16(), reason="bf16 products here do not meet the proof's premises")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, DIM), queries (20, DIM)) float32 of one adversarial kind."""
    q = _unit(rng.standard_normal((20, DIM)))
    if kind == "random":
        x = _unit(rng.standard_normal((n, DIM)))
    elif kind == "lowrank":
        basis = rng.standard_normal((8, DIM))
        x = _unit(rng.standard_normal((n, 8)) * np.linspace(1, 0.1, 8) @ basis + 0.02 * rng.standard_normal((n, DIM)))
        q = _unit(rng.standard_normal((20, 8)) @ basis)
    elif kind == "near_ties":  # 120 items per query within ~1e-5 of each other: far below bf16's 2^-8
        x = _unit(rng.standard_normal((n, DIM)))
        spread = rng.permutation(n)[:1200].reshape(10, 120)
        for j in range(10):
            x[spread[j]] = _unit(q[j] + 1e-5 * rng.standard_normal((120, DIM)))
    elif kind == "duplicates":  # the best items repeated many times, ties broken by the lower slot
        x = _unit(rng.standard_normal((n, DIM)))
        for j in range(10):
            x[rng.choice(n, 40, replace=False)] = x[j]
            q[j] = _unit(x[j][None] + 0.1 * rng.standard_normal((1, DIM)))[0]
    elif kind == "unnormalised":
        x = (rng.standard_normal((n, DIM)) * np.exp(rng.uniform(-4, 4, (n, 1)))).astype(np.float32)
        q = (q * np.exp(rng.uniform(-3, 3, (20, 1)))).astype(np.float32)
    elif kind == "all_alike":  # every score within bf16's error: the candidate set is everything
        x = _unit(np.ones((1, DIM)) + 1e-4 * rng.standard_normal((n, DIM)))
        q = _unit(np.ones((20, DIM)) + 0.01 * rng.standard_normal((20, DIM)))
    elif kind.startswith("rounding_trap"):  # bf16 rounding ranks 240 (short: 20) worse items, B, above the 5 best, A
        b = 20 if kind == "rounding_trap_short" else 240
        x = (0.01 * rng.standard_normal((n, DIM))).astype(np.float32)
        q = np.ones((20, DIM), np.float32)
        x[:5] = 1 + 0.49 * 2.0 ** -7              # real 64.245, bf16 score 64.0
        x[5:5 + b] = 1 - 0.49 * 2.0 ** -8          # real 64.199, bf16 score 64.5
        x[5:5 + b, :33] = 1 + 2.0 ** -7
        x = x[np.concatenate([np.arange(5), 5 + rng.permutation(n - 5)])]  # B scattered
    elif kind == "huge":  # norms near fp32's range: handed to the fp32 path
        x = (_unit(rng.standard_normal((n, DIM))) * 1e16).astype(np.float32)
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(q, np.float32)


def _fp32_topk(rows: torch.Tensor):
    def run(q: torch.Tensor, k: int):
        r = torch.topk(q @ rows.T, k, dim=1)
        return r.values, r.indices
    return run


def _check_exact(x: np.ndarray, q: np.ndarray, scores: np.ndarray, slots: np.ndarray, k: int) -> None:
    """``slots`` is an fp32 top-k: it holds every item whose real score beats the k-th by more than fp32's
    error, only items within that error of the k-th, scores to fp32 accuracy, best first, ties by slot."""
    real = q.astype(np.float64) @ x.astype(np.float64).T                      # (Q, N)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    g = exact.sum_error(x.shape[1])
    for row in range(len(q)):
        tol = 2 * g * np.linalg.norm(q[row].astype(np.float64)) * norms.max() + 1e-30
        kth = np.sort(real[row])[::-1][k - 1]
        got = slots[row]
        assert len(set(got.tolist())) == k and (got >= 0).all()
        must = np.flatnonzero(real[row] > kth + tol)
        assert set(must.tolist()) <= set(got.tolist()), f"query {row} lost an item of the top {k}"
        assert (real[row, got] >= kth - tol).all(), f"query {row} returned an item below the top {k}"
        np.testing.assert_allclose(scores[row], real[row, got], rtol=1e-6, atol=tol)
        assert (np.diff(scores[row]) <= 0).all()
        same = np.flatnonzero(np.diff(scores[row]) == 0)
        assert (got[same] < got[same + 1]).all(), "equal scores must come in slot order"


def _same_ids_up_to_rounding_ties(got: np.ndarray, ref_scores: np.ndarray, ref_ids: np.ndarray) -> None:
    """The ids of fp32 matmul + top-k, in order, except that two items whose fp32 scores agree to rounding
    (the rescoring sums in another order than the full product) may swap, also across the k-th place."""
    for row in range(len(got)):
        for i in np.flatnonzero(got[row] != ref_ids[row]):
            where = np.flatnonzero(ref_ids[row] == got[row, i])
            other = ref_scores[row, where[0]] if len(where) else ref_scores[row, -1]  # outside: ties the k-th
            assert abs(other - ref_scores[row, i]) <= 1e-6 * abs(ref_scores[row, i]) + 1e-7, \
                f"query {row}, place {i}: id {got[row, i]} where fp32 + top-k has {ref_ids[row, i]}"


@needs_bf16
@pytest.mark.parametrize("kind", ["random", "lowrank", "near_ties", "duplicates", "unnormalised", "rounding_trap",
                                  "rounding_trap_short", "all_alike", "huge"])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_two_stage_is_the_fp32_top_k(kind: str, k: int) -> None:
    x, q = _data(kind, 4000, np.random.default_rng(zlib.crc32(f"{kind}-{k}".encode())))  # the same data in every process
    rows = torch.from_numpy(x)
    two = exact.TwoStage(rows, exact.rounding_norms(x))
    scores, slots = two.search(torch.from_numpy(q), k, _fp32_topk(rows))
    _check_exact(x, q, scores.numpy(), slots.numpy(), k)
    ref = _fp32_topk(rows)(torch.from_numpy(q), k)
    if kind in ("random", "lowrank"):  # no near-ties: the very ids of fp32 matmul + top-k, in order
        np.testing.assert_allclose(scores.numpy(), ref[0].numpy(), rtol=1e-6, atol=1e-7)
        _same_ids_up_to_rounding_ties(slots.numpy(), ref[0].numpy(), ref[1].numpy())
    stats = two.stats
    assert stats.queries == len(q)
    if kind == "all_alike":
        assert stats.full_fp32 == len(q)  # the candidates would be every item: full fp32 instead
    if kind == "huge":
        assert stats.full_fp32 == len(q) and stats.rescored == 0
    if kind.startswith("rounding_trap"):  # the 5 best rank below the others in bf16: only the margin finds them
        cheap = torch.mm(torch.from_numpy(q[:1]).bfloat16(), rows.T.bfloat16())[0].float()
        worse = np.flatnonzero(x[:, -1] == np.float32(1 - 0.49 * 2.0 ** -8))
        assert len(worse) in (20, 240) and float(cheap[:5].max()) < float(cheap[worse].min())
        assert set(slots[:, :min(k, 5)].flatten().tolist()) <= set(range(5))
        if kind == "rounding_trap":  # 245 past the cheap top-32 (or top-200): the mask finds them
            assert stats.from_shortlist == 0 and stats.full_fp32 == 0
        elif k <= 10:  # 25 inside the cheap top-32: the shortlist's prefix above the limit holds them
            assert stats.from_shortlist == len(q) and stats.full_fp32 == 0
        # k = 100 with 25 big items: the all-item limit uses the largest item's error, so nearly every
        # small item is a candidate and the queries are scored in full fp32 (exact, checked above)


@needs_bf16
@pytest.mark.parametrize("n,k", [(50, 49), (50, 50), (300, 200)])
def test_two_stage_with_k_near_n(n: int, k: int) -> None:
    x, q = _data("random", n, np.random.default_rng(n + k))
    rows = torch.from_numpy(x)
    scores, slots = exact.TwoStage(rows, exact.rounding_norms(x)).search(torch.from_numpy(q), k, _fp32_topk(rows))
    _check_exact(x, q, scores.numpy(), slots.numpy(), k)


@needs_bf16
@pytest.mark.parametrize("kind", ["random", "lowrank", "unnormalised"])
def test_error_bound_holds_and_is_not_vacuous(kind: str) -> None:
    """|s_bf16 - s| <= E_i + u'|s_bf16| for every pair; the observed maximum reaches a fair share of it."""
    x, q = _data(kind, 4000, np.random.default_rng(7))
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    cheap = torch.mm(qt.bfloat16(), xt.T.bfloat16()).double()
    real = qt.double() @ xt.double().T
    xn = exact._norms(xt)
    bound = exact.item_error(exact._norms(qt)[:, :, None], xn[:, None, :], float(xn[0].max()), DIM)
    bound = bound + exact.U_OUT * cheap.abs()
    ratio = ((cheap - real).abs() / bound).max().item()
    assert ratio <= 1.0
    assert ratio > 0.05, f"the bound is {1 / ratio:.0f}x the worst error seen: far looser than expected"


def test_first_stage_choice_and_its_errors(monkeypatch) -> None:
    assert exact.choose_first_stage("fp32").name == "fp32"
    choice = exact.choose_first_stage("auto")
    assert choice.name in ("bf16", "fp32") and choice.reason
    monkeypatch.setenv(exact.ENV_VAR, "fp32")
    assert exact.choose_first_stage("auto") == exact.FirstStage("fp32", "fp32 requested")
    monkeypatch.setenv(exact.ENV_VAR, "int4")
    with pytest.raises(ValueError, match="int4"):
        exact.choose_first_stage("auto")
    with pytest.raises(ValueError, match="valid: auto, bf16, fp32"):
        exact.choose_first_stage("fp16")
    with pytest.raises(ValueError, match="flat_first_stage"):
        IndexParams(flat_first_stage="fp16")
    monkeypatch.delenv(exact.ENV_VAR)
    # a CPU without AMX / AVX512-BF16, or one whose bf16 products fail the probe, searches in fp32
    monkeypatch.setattr(exact, "_cpu_has_bf16", lambda: (False, "no AMX or AVX512-BF16 on this CPU"))
    assert exact.choose_first_stage("auto") == exact.FirstStage("fp32", "no AMX or AVX512-BF16 on this CPU")
    monkeypatch.setattr(exact, "_cpu_has_bf16", lambda: (True, "AMX"))
    monkeypatch.setattr(exact, "probe_bf16", lambda threads: (False, "bf16 outputs are not rounded to nearest here"))
    assert exact.choose_first_stage("auto").name == "fp32"
    assert exact.choose_first_stage("bf16").name == "fp32"  # asked for, but not exact here: refused
    monkeypatch.setattr(exact, "probe_bf16", lambda threads: (True, "bf16 product 9.0x fp32 in the probe"))
    assert exact.choose_first_stage("auto") == exact.FirstStage("bf16", "AMX: bf16 product 9.0x fp32 in the probe")
    store = FlatStore(DIM, IndexParams())
    store.add(_unit(np.random.default_rng(0).standard_normal((exact.MIN_ITEMS, DIM))))
    assert store.first_stage.name == "bf16" and store.vectors.flags.c_contiguous


@needs_bf16
def test_index_flat_two_stage_matches_fp32_and_survives_save_load(tmp_path) -> None:
    rng = np.random.default_rng(3)
    x, q = _data("lowrank", 6000, rng)
    two = Index.build(x, kind="flat", params=IndexParams(flat_first_stage="bf16"))
    one = Index.build(x, kind="flat", params=IndexParams(flat_first_stage="fp32"))
    assert two._store.first_stage.name == "bf16" and one._store.first_stage.name == "fp32"
    assert two._store.vectors.flags.c_contiguous and one._store.vectors.flags.f_contiguous
    ids2, s2 = two.search(q, 10)
    ids1, s1 = one.search(q, 10)
    np.testing.assert_array_equal(ids2, ids1)
    np.testing.assert_allclose(s2, s1, rtol=1e-6, atol=1e-7)
    assert two._store._two is not None and two._store._two.stats.queries == len(q)
    single = two.search(q[:1], 10)  # below exact.MIN_QUERIES: one fp32 stage, same answer
    assert two._store._two.stats.queries == len(q)
    np.testing.assert_array_equal(single[0], ids1[:1])
    # k above N: padded like the fp32 path
    ids, scores = two.search(q[:2], 7000)
    assert (ids[:, 6000:] == -1).all() and np.isneginf(scores[:, 6000:]).all()
    np.testing.assert_array_equal(np.sort(ids[:, :6000], axis=1), np.tile(np.arange(6000), (2, 1)))
    # removal compacts and keeps the layout; the saved file is Fortran order whatever the layout
    two.remove([int(i) for i in ids1[0, :3]])
    assert two._store.vectors.flags.c_contiguous and len(two) == 5997
    assert not set(two.search(q[:1], 10)[0][0].tolist()) & set(ids1[0, :3].tolist())
    two.save(tmp_path / "ix")
    assert np.load(tmp_path / "ix" / "vectors.npy", mmap_mode="r").flags.f_contiguous
    loaded = Index.load(tmp_path / "ix")
    mapped = Index.load(tmp_path / "ix", mmap=True)
    assert mapped._store.first_stage.name == "fp32"
    a, b, c = (ix.search(q, 10) for ix in (two, loaded, mapped))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])
    np.testing.assert_allclose(a[1], c[1], rtol=1e-6, atol=1e-7)
