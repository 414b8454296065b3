"""Exact top-k by inner product in two stages: a cheap bf16 product finds the candidates, fp32 decides.

Stage 1 scores every stored vector with a bf16 product (AMX / AVX512-BF16: many times fp32's speed).
Stage 2 rescores in fp32 every item whose cheap score could still reach the top k, so the result is
the fp32 top-k. Why no item is lost. Write x~ = bf16(x), dx = x~ - x (stored: ||dx|| per item), u = 2^-8
(bf16's unit roundoff), u' = u / (1 - u), g = n 2^-24 / (1 - n 2^-24) for n = D + 2 (fp32 sums):

- q~.x~ - q.x = q~.dx + dq.x, so ``|q~.x~ - q.x| <= ||q~|| ||dx|| + ||dq|| ||x||``; bf16 x bf16 products are
  exact in fp32, their fp32 sum is within ``g ||q~|| ||x~||`` of q~.x~, and the bf16 output s^ within
  ``u' |s^|`` of the sum (round to nearest). An fp32 score is within ``g ||q|| ||x||`` of q.x. So every
  item's fp32 score lies in ``s^ -+ (E_i + u' |s^|)`` with ``E_i = ||q~|| ||dx_i|| + ||dq|| ||x_i||
  + g (||q~|| ||x~_i|| + ||q|| ||x_i||) + slack`` (slack: subnormals flushed to zero, ~2^-120).
- the k items of the best cheap scores (the witnesses) all have an fp32 score of at least
  ``w = min_j (s^_j - u' |s^_j| - E_j)`` over them.
- an item with ``s^_i + u' |s^_i| + E_i < w`` has an fp32 score below all k witnesses: it is not in
  the fp32 top-k. Every other item is a candidate and is rescored in fp32.

The per-item norms are computed in float64 when the vectors are added and rounded up. Candidates
are read from the cheap top-``K'`` of each query when its ``K'``-th score is already below the
candidate limit (the usual case), else from a mask over all items; a query with more than
``N * CAP_FRACTION`` candidates is scored in full fp32. Whether bf16 runs here is decided once per
process by :func:`choose_first_stage` from the CPU's flags (``torch.cpu``) and a probe: sums must
accumulate in fp32 over the whole product (``1 + 1 + ... = D`` and ``256 + 1 + ... + 1 - 256 = D - 2``
exactly: partial sums stored in bf16, in any blocking, miss it), outputs round to nearest, random products stay
within the bound, and bf16 must beat fp32 by ``MIN_SPEEDUP``.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

U_BF16 = 2.0 ** -8
U_OUT = U_BF16 / (1 - U_BF16)   # |s^ - sum| <= U_OUT |s^| for a round-to-nearest bf16 output
U_FP32 = 2.0 ** -24
ABS_SLACK_SCALE = 2.0 ** -120   # covers inputs / outputs flushed to zero (bf16 subnormals)
MAX_SAFE_NORM = 1e15             # |q| |x| beyond ~1e30: fp32 itself is near overflow, use the fp32 path
MIN_ITEMS = 4096                 # below this many items fp32 alone is as fast
MIN_ITEMS_PER_K = 32             # and when k is more than N / 32
MIN_QUERIES = 8                  # and for fewer queries at once (fixed costs: ~2.6x fp32's time for 1 query)
SHORTLIST_MIN = 32               # K' = max(SHORTLIST_MIN, 2 k): the cheap top-K' read per query
CAP_FRACTION = 1 / 16            # a query with more candidates than N / 16 is scored in full fp32
MIN_SPEEDUP = 2.0                # bf16 product / fp32 product speed the probe must see
FIRST_STAGES = ("auto", "bf16", "fp32")
ENV_VAR = "ERNIE_VL_FLAT_FIRST_STAGE"  # overrides "auto" (for tests and comparisons)


def sum_error(dim: int) -> float:
    """g: an fp32 sum of ``dim`` products is within ``g sum |terms|`` of the real sum."""
    n = dim + 2
    return n * U_FP32 / (1 - n * U_FP32)


NORM_BLOCK = 8192   # rows per block: three float64 copies of a block are the temporaries


def rounding_norms(x: np.ndarray) -> np.ndarray:
    """(N, D) float32 -> (3, N) float64 upper bounds of ||x||, ||bf16(x) - x|| and ||bf16(x)|| per row
    (computed in float64, nudged up)."""
    out = np.empty((3, len(x)), np.float64)
    for s in range(0, len(x), NORM_BLOCK):
        block = torch.from_numpy(np.ascontiguousarray(x[s:s + NORM_BLOCK]))
        out[:, s:s + len(block)] = _norms(block).numpy()
    return out


def _norms(x: torch.Tensor) -> torch.Tensor:
    """(n, D) float32 -> (3, n) float64: ||x||, ||bf16(x) - x||, ||bf16(x)||, nudged up."""
    wide = x.double()
    cheap = x.to(torch.bfloat16).double()
    return torch.stack([torch.linalg.vector_norm(v, dim=1) for v in (wide, cheap - wide, cheap)]) * (1 + 1e-12)


@dataclass(frozen=True)
class FirstStage:
    """The first-stage product a flat index runs here, and why."""

    name: str    # "bf16" (two stages) or "fp32" (one stage)
    reason: str


def _cpu_has_bf16() -> tuple[bool, str]:
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    if amx or avx:
        return True, "AMX" if amx else "AVX512-BF16"
    return False, "no AMX or AVX512-BF16 on this CPU"


def _best_times(fns, rounds: int = 9) -> list[float]:
    """The fastest of ``rounds`` runs of each function, the functions taking turns (a burst of load from
    other processes hits them alike; the fastest run is the machine's speed, not its load)."""
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def probe_bf16(threads: int) -> tuple[bool, str]:
    """(use bf16, why): accumulation, rounding, error bound and speed, checked once per process and
    thread count."""
    dim = 512
    ones = torch.ones(1, dim, dtype=torch.bfloat16)
    if float(torch.mm(ones, ones.T)) != dim:  # a bf16 accumulator would stall at 256
        return False, "bf16 products do not accumulate in fp32 here"
    swing = torch.ones(1, dim, dtype=torch.bfloat16)
    swing[0, 0], swing[0, -1] = 256.0, -256.0
    if float(torch.mm(ones, swing.T)) != dim - 2:  # 256 + 1 + ... + 1 - 256: partial sums kept in bf16 give 0 or 512
        return False, "bf16 partial sums are rounded to bf16 here"
    near = torch.zeros(1, dim, dtype=torch.bfloat16)
    near[0, :4] = torch.tensor([1.0, 2.0 ** -9, 2.0 ** -9, 2.0 ** -9])
    if float(torch.mm(near, ones.T)) != 1 + 2.0 ** -7:  # 1 + 3 2^-9 rounds to nearest, not down to 1
        return False, "bf16 outputs are not rounded to nearest here"
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(64, dim, generator=gen)
    x = (torch.randn(8192, dim, generator=gen) * torch.rand(8192, 1, generator=gen)).contiguous()
    cheap = torch.mm(q.bfloat16(), x.T.bfloat16())
    exact = q.double() @ x.double().T
    xn = _norms(x)
    bound = item_error(_norms(q)[:, :, None], xn[:, None, :], float(xn[0].max()), dim) + U_OUT * cheap.double().abs()
    if not bool(((cheap.double() - exact).abs() <= bound).all()):
        return False, "bf16 products exceeded the proven error bound in the probe"
    qb, xb, xt = q.bfloat16(), x.T.bfloat16().contiguous(), x.T.contiguous()
    t32, t16 = _best_times([lambda: torch.mm(q, xt), lambda: torch.mm(qb, xb)])
    speedup = t32 / max(t16, 1e-9)
    if speedup < MIN_SPEEDUP:
        return False, f"bf16 product only {speedup:.1f}x fp32 in the probe (needs {MIN_SPEEDUP:.1f}x)"
    return True, f"bf16 product {speedup:.1f}x fp32 in the probe"


def item_error(qn: torch.Tensor, xn: torch.Tensor, x_norm_max: float, dim: int) -> torch.Tensor:
    """E of the module's proof (without the output term), elementwise over broadcastable float64 norm
    triples ``qn`` = (||q||, ||dq||, ||q~||) and ``xn`` = (||x||, ||dx||, ||x~||) (each a stacked (3, ...))."""
    g = sum_error(dim)
    q, dq, qc = qn
    x, dx, xc = xn
    slack = ABS_SLACK_SCALE * (math.sqrt(dim) * (q + x_norm_max) + dim)
    return qc * dx + dq * x + g * (qc * xc + q * x) + slack


def choose_first_stage(setting: str = "auto") -> FirstStage:
    """``auto``: bf16 where the CPU has AMX / AVX512-BF16 and the probe passes, else fp32.
    ``ERNIE_VL_FLAT_FIRST_STAGE=bf16|fp32`` overrides ``auto``; ``bf16`` on a CPU that fails the
    probe's accuracy checks still falls back to fp32 (the two stages would not be exact there)."""
    if setting not in FIRST_STAGES:
        raise ValueError(f"unknown flat first stage {setting!r}; valid: {', '.join(FIRST_STAGES)}")
    if setting == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced and forced not in FIRST_STAGES[1:]:
            raise ValueError(f"{ENV_VAR}={forced!r} is not one of {', '.join(FIRST_STAGES[1:])}")
        setting = forced or setting
    if setting == "fp32":
        return FirstStage("fp32", "fp32 requested")
    has, what = _cpu_has_bf16()
    ok, why = probe_bf16(torch.get_num_threads())
    if setting == "bf16":
        exact = ok or why.startswith("bf16 product only")
        return FirstStage("bf16" if exact else "fp32", f"bf16 requested: {why}")
    if not has:
        return FirstStage("fp32", what)
    return FirstStage("bf16" if ok else "fp32", f"{what}: {why}")


@dataclass
class SearchStats:
    """What the last search did: queries, how many were read from the cheap top-K', scored in full
    fp32, and the fp32 rescorings."""

    queries: int = 0
    from_shortlist: int = 0
    full_fp32: int = 0
    rescored: int = 0


def use_two_stage(n: int, k: int, queries: int) -> bool:
    """Whether a top-``k`` search of ``queries`` queries over ``n`` items gains from two stages."""
    return n >= MIN_ITEMS and k * MIN_ITEMS_PER_K <= n and queries >= MIN_QUERIES


def _lower(values: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, rounded down (a limit that keeps every candidate)."""
    return torch.from_numpy(np.nextafter(values.numpy().astype(np.float32), np.float32(-np.inf)))


class TwoStage:
    """The bf16 first stage over fp32 rows: ``search(q (Q, D), k) -> scores, slots``, the fp32 top-k.

    ``rows``: (N, D) float32 tensor (C-contiguous); ``norms``: (3, N) float64 from :func:`rounding_norms`.
    Keeps a (D, N) bf16 copy of the rows (half their memory).
    """

    def __init__(self, rows: torch.Tensor, norms: np.ndarray) -> None:
        self.rows = rows
        self.cheap = rows.T.to(torch.bfloat16).contiguous()
        self.norms = torch.from_numpy(norms)
        self.norm_max = self.norms.amax(1) if self.norms.shape[1] else torch.zeros(3, dtype=torch.float64)
        self.stats = SearchStats()

    def search(self, q: torch.Tensor, k: int, full_fp32) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) fp32 -> (scores (Q, k) fp32, slots (Q, k) int64) best first, ties by lower slot;
        ``full_fp32(q, k)`` scores the queries that are not worth two stages (same return)."""
        n, dim = self.rows.shape
        k = min(k, n)
        qn = _norms(q)                                                    # (3, Q)
        x_max = float(self.norm_max[0])
        e_max = item_error(qn, self.norm_max[:, None], x_max, dim)        # (Q,): >= E_i of every item
        s = torch.mm(q.to(torch.bfloat16), self.cheap)                    # (Q, N) bf16
        short = min(n, max(SHORTLIST_MIN, 2 * k))
        top_s, top_i = torch.topk(s, short, dim=1)
        top = top_s.double()
        best = top[:, :k]                                                  # the k witnesses' cheap scores
        e_best = item_error(qn[:, :, None], self.norms[:, top_i[:, :k]], x_max, dim)
        witness = (best - U_OUT * best.abs() - e_best).amin(1)             # their fp32 scores are >= this
        # an item is a candidate when s^ + U_OUT |s^| + E_i >= witness; s -> s + U_OUT |s| is increasing
        y = witness - e_max
        limit = torch.where(y >= 0, y / (1 + U_OUT), y / (1 - U_OUT))
        out_s = torch.empty(len(q), k, dtype=torch.float32)
        out_i = torch.empty(len(q), k, dtype=torch.int64)
        safe = qn[0] * x_max < MAX_SAFE_NORM
        listed = safe & (top[:, -1] < limit) if short < n else safe
        self.stats = SearchStats(len(q), int(listed.sum()))
        if bool(listed.any()):
            rows = torch.nonzero(listed).flatten()
            # the scores are sorted: each row's candidates are a prefix of it; read the longest prefix
            width = max(k, int((top[rows] >= limit[rows, None]).sum(1).max()))
            slots = top_i[rows, :width]                                   # (R, width), all candidates inside
            cand = self.rows.index_select(0, slots.flatten()).view(len(rows), width, dim)
            exact = torch.bmm(cand, q[rows].unsqueeze(2)).squeeze(2)       # (R, K') fp32
            out_s[rows], out_i[rows] = best_first(exact, slots, k)
            self.stats.rescored += slots.numel()
        rest = torch.nonzero(~listed).flatten()
        if len(rest):
            self._masked(q, qn, k, rest, s, limit, witness, out_s, out_i, full_fp32)
        return out_s, out_i

    def _masked(self, q, qn, k, rest, s, limit, witness, out_s, out_i, full_fp32) -> None:
        """Queries whose candidates reach past the cheap top-K': select over all items."""
        n = self.rows.shape[0]
        mask = s[rest] >= _lower(limit[rest])[:, None]
        counts = mask.sum(1)
        ok = (counts <= max(int(n * CAP_FRACTION), k)) & (qn[0][rest] * float(self.norm_max[0]) < MAX_SAFE_NORM)
        if not bool(ok.all()):
            bad = rest[~ok]
            out_s[bad], out_i[bad] = best_first(*full_fp32(q[bad], k), k)
            self.stats.full_fp32 += len(bad)
        good = rest[ok]
        if len(good) == 0:
            return
        pairs = mask[ok].nonzero()                                       # (P, 2): row of good, slot (ascending)
        qi, slot = pairs[:, 0], pairs[:, 1]
        cheap = s[good[qi], slot].double()
        e = item_error(qn[:, good[qi]], self.norms[:, slot], float(self.norm_max[0]), q.shape[1])
        keep = cheap + U_OUT * cheap.abs() + e >= witness[good][qi]
        qi, slot = qi[keep], slot[keep]
        exact = (self.rows.index_select(0, slot) * q[good].index_select(0, qi)).sum(1)
        per = torch.bincount(qi, minlength=len(good))
        assert int(per.min()) >= k, "the k witnesses are always candidates"
        start = torch.cumsum(per, 0) - per
        col = torch.arange(len(qi)) - start[qi]
        scores = torch.full((len(good), int(per.max())), -torch.inf)
        slots = torch.full((len(good), int(per.max())), n, dtype=torch.int64)
        scores[qi, col], slots[qi, col] = exact, slot
        out_s[good], out_i[good] = best_first(scores, slots, k)
        self.stats.rescored += len(slot)


def best_first(scores: torch.Tensor, slots: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row, equal scores in slot order: (R, C) scores and slots -> (R, k) each."""
    by_slot = torch.sort(slots, dim=1, stable=True)
    scores, slots = scores.gather(1, by_slot.indices), by_slot.values
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), slots.gather(1, order)
