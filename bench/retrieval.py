"""Search benchmark: our Index kinds vs FAISS IndexFlatIP and a plain torch matmul + top-k.

Queries/s (batches of 100 queries), recall@10 against exact search, build time and memory for
normalised 512-d vectors, random and low-rank (like real embeddings). Interleaved rounds, medians,
2 threads. At the main size, exact search also in small batches (1 and 8 queries per call, as a user
searches), against the same anchors: reported without a verdict (the goal is stated at batches of
100). Writes bench/results/retrieval.md.

    .venv/bin/python bench/retrieval.py            # 100k vectors (default, a few minutes)
    .venv/bin/python bench/retrieval.py --quick    # 20k vectors, 1000 queries
    .venv/bin/python bench/retrieval.py --full     # 1M exact + hnsw at 100k / 200k (~15 min, < 5 GB)
    .venv/bin/python bench/retrieval.py --approx-n 200000   # hnsw / ivfpq at 200k (slow builds on 2 cores)
    .venv/bin/python bench/retrieval.py --scale    # 1M vectors: IVF-PQ from parts under 1 GB (bench/retrieval_scale.py)

``--full``: exact search over 1M random and 1M low-rank vectors (ours, FAISS IndexFlatIP, torch),
then the approximate kinds on low-rank data at 100k and 200k. An HNSW graph over 1M vectors costs
~0.6 ms of CPU per vector here (~10 CPU-minutes), more than this shared 2-core machine allows in
the run; its build time and recall at 1M are extrapolated from the 100k and 200k builds (marked so).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval import exact  # noqa: E402
from retrieval.backends import IndexParams  # noqa: E402
from retrieval.index import AUTO_APPROX_THRESHOLD, Index, resolve_kind  # noqa: E402

from _report import Verdict, command_line, machine, write_results  # noqa: E402

DIM, K, QUERY_BATCH = 512, 10, 100
SMALL_BATCHES = (1, 8)  # queries per call as a user searches (information: the goal is stated at batches of 100)
SMALL_CALLS = 32        # calls per method per round in the small-batch rows


def make_vectors(n: int, kind: str, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    """Unit vectors: ``random`` Gaussian, or ``lowrank``: 64 latent factors with a decaying spectrum + noise."""
    if kind == "random":
        x = rng.standard_normal((n, DIM), dtype=np.float32)
    else:
        r = basis.shape[0]
        z = rng.standard_normal((n, r), dtype=np.float32) * np.linspace(1.0, 0.1, r, dtype=np.float32)
        x = z @ basis
        del z
        noise = rng.standard_normal((n, DIM), dtype=np.float32)  # in place: at 1M each temporary is 2 GB
        noise *= np.float32(0.05 * np.sqrt(r / DIM))
        x += noise
        del noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Ground truth, 100 queries at a time (a (Q, 1M) score matrix would be 2 GB)."""
    xt = torch.from_numpy(x)
    return np.concatenate([torch.topk(torch.from_numpy(q[s:s + 100]) @ xt.T, k, dim=1).indices.numpy()
                           for s in range(0, len(q), 100)])


class Timer:
    """Wall and process CPU seconds (all threads) of a ``with`` block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def torch_plain(x_t: torch.Tensor, q: np.ndarray, k: int):
    return torch.topk(torch.from_numpy(q) @ x_t.T, k, dim=1)


def interleaved_qps(fns: dict, queries: np.ndarray, batch_size: int = QUERY_BATCH) -> dict[str, float]:
    """Queries/s of each function over all ``queries`` in batches of ``batch_size``, the methods taking
    turns batch by batch (rotating who goes first) so that a change in the machine's load hits them alike."""
    spent = dict.fromkeys(fns, 0.0)
    names = list(fns)
    for b, s in enumerate(range(0, len(queries), batch_size)):
        batch = queries[s:s + batch_size]
        for name in names[b % len(names):] + names[:b % len(names)]:
            t = time.perf_counter()
            fns[name](batch)
            spent[name] += time.perf_counter() - t
    return {name: len(queries) / spent[name] for name in names}


def time_qps(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    for s in range(0, len(queries), QUERY_BATCH):
        fn(queries[s:s + QUERY_BATCH])
    return len(queries) / (time.perf_counter() - t)


def searcher(index, k: int = K):
    """``index.search(batch, k)`` as a one-argument function that holds ``index`` itself, not the caller's
    variable (which the caller deletes to free the index's memory once it is timed)."""
    return lambda batch: index.search(batch, k)


def index_bytes(index: Index) -> int:
    store = index._store
    if index.kind == "flat":  # the fp32 vectors, and the bf16 copy of the two-stage search when built
        two = store._two
        return store.vectors.nbytes + (two.cheap.numel() * two.cheap.element_size() if two is not None else 0)
    return int(faiss.serialize_index(store.index).nbytes)


def bound_check(x: np.ndarray, q: np.ndarray) -> str:
    """The largest |bf16 score - exact score| over all (query, item) pairs against the bound the two-stage
    search uses for that pair (retrieval/exact.py), as one sentence."""
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    cheap = torch.mm(qt.to(torch.bfloat16), xt.T.to(torch.bfloat16)).double()
    real = qt.double() @ xt.double().T
    xn = exact._norms(xt)
    bound = exact.item_error(exact._norms(qt)[:, :, None], xn[:, None, :], float(xn[0].max()), DIM)
    ratio = (cheap - real).abs() / (bound + exact.U_OUT * cheap.abs())
    return (f" Rounding bound on these data ({len(q)} queries x {len(x):,} items): the largest bf16 error is "
            f"{ratio.max().item():.3f} of its proven bound (mean {ratio.mean().item():.3f}; above 1 would be a bug).")


def small_batch_rows(fns: dict, anchors: tuple[str, ...], q: np.ndarray, rounds: int, n: int, data_kind: str,
                     lines: list[str]) -> None:
    """Latency of ours and the exact anchors at 1 and 8 queries per call (``SMALL_CALLS`` calls per method per
    round, taking turns call by call, rotating who goes first; median of ``rounds``). Reported, no verdict."""
    lines.append(f"\n### {n:,} vectors, {data_kind}: exact search in small batches (information, no goal)\n")
    lines.append("| queries per call | " + " | ".join(f"{name} ms" for name in ("ours flat", *anchors))
                 + " | ours / fastest anchor (per round) |")
    lines.append("|---:|" + "---:|" * (len(anchors) + 2))
    for size in SMALL_BATCHES:
        calls = q[:size * SMALL_CALLS]
        for fn in fns.values():
            fn(calls[:size])  # warm-up at this size
        per_round = [interleaved_qps(fns, calls, batch_size=size) for _ in range(rounds)]
        ms = {name: 1000 * size / float(np.median([r[name] for r in per_round])) for name in fns}
        ratios = [r["ours flat"] / max(r[a] for a in anchors) for r in per_round]
        lines.append(f"| {size} | " + " | ".join(f"{ms[name]:.2f}" for name in ("ours flat", *anchors))
                     + f" | **{np.median(ratios):.2f}x** ({', '.join(f'{v:.2f}' for v in ratios)}) |")
        print(lines[-1], flush=True)
    lines.append(f"\nMilliseconds per call, median of {rounds} rounds of {SMALL_CALLS} calls per method; the ratio is "
                 "ours' queries/s over the fastest exact anchor's in the same round (above 1: ours is faster).")


def faiss_flat_view(ref: faiss.IndexFlat, n: int) -> np.ndarray:
    """(n, D) view of the vectors FAISS holds (no copy), so the caller can free its own copy."""
    return faiss.rev_swig_ptr(ref.get_xb(), n * DIM).reshape(n, DIM)


def run_size(n: int, data_kind: str, rounds: int, num_queries: int, approx: bool, ef_values, rng, basis, lines,
             approx_log: dict | None = None, ivfpq: bool = True, verdicts: list | None = None,
             small_batches: bool = False) -> None:
    x = make_vectors(n, data_kind, rng, basis)
    q = make_vectors(num_queries, data_kind, rng, basis)
    truth = exact_topk(x, q, K)
    print(f"[{n:,} {data_kind}] exact search", flush=True)

    with Timer() as build_ref:
        ref = faiss.IndexFlatIP(DIM)
        ref.add(x)
    x = faiss_flat_view(ref, n)  # drop our copy: at 1M each copy is 2 GB
    with Timer() as build_flat:
        ours = Index.build(x, kind="flat")
    x_t = torch.from_numpy(x)  # plain torch on the (N, D) rows a user holds
    x_cols = torch.from_numpy(np.ascontiguousarray(x.T))  # and on (D, N) columns, MKL's fast layout for few queries
    x_bf16 = x_cols.to(torch.bfloat16)  # not exact: shows what bf16 alone gives up
    # each function holds its operands (a searcher, default arguments): the names are deleted below to free memory
    fns = {"ours flat": searcher(ours), "FAISS IndexFlatIP": searcher(ref),
           "torch matmul+topk": lambda b, x_t=x_t: torch_plain(x_t, b, K),
           "torch matmul+topk (D, N)": lambda b, x_cols=x_cols: torch.topk(torch.from_numpy(b) @ x_cols, K, dim=1),
           "torch bf16": lambda b, x_bf16=x_bf16: torch.topk(torch.from_numpy(b).to(torch.bfloat16) @ x_bf16, K,
                                                            dim=1)}
    for fn in fns.values():
        fn(q[:QUERY_BATCH])  # warm-up
    qps = {name: [] for name in fns}
    for _ in range(rounds):
        for name, rate in interleaved_qps(fns, q).items():
            qps[name].append(rate)
    med = {name: float(np.median(v)) for name, v in qps.items()}
    stage = ours._store.first_stage
    two_stage = ours._store._two is not None
    stats = []  # what the two stages did, batch by batch
    for s in range(0, len(q), QUERY_BATCH) if two_stage else ():
        ours.search(q[s:s + QUERY_BATCH], K)
        stats.append(ours._store._two.stats)
    bound_line = bound_check(x, q[:QUERY_BATCH]) if two_stage else ""
    rec_ours = recall(ours.search(q, K)[0], truth)
    rec_ref = recall(ref.search(q, K)[1], truth)
    rec_bf16 = recall(np.concatenate([fns["torch bf16"](q[s:s + QUERY_BATCH]).indices.numpy()
                                      for s in range(0, len(q), QUERY_BATCH)]), truth)
    anchors = ("FAISS IndexFlatIP", "torch matmul+topk", "torch matmul+topk (D, N)")
    best_anchor = max(med[a] for a in anchors)
    best_name = max(anchors, key=lambda a: med[a])
    lines.append(f"\n### {n:,} vectors, {data_kind}: exact search ({num_queries} queries in batches of {QUERY_BATCH})\n")
    lines.append("| method | q/s (median) | recall@10 | build s | memory MB |")
    lines.append("|---|---:|---:|---:|---:|")
    ours_name = ("ours `flat` (two stages: bf16 candidates, fp32 rescoring; exact)" if two_stage
                 else "ours `flat` (chunked fp32 matmul + top-k, (D, N) layout)")
    lines.append(f"| {ours_name} | {med['ours flat']:.0f} | {rec_ours:.3f} | "
                 f"{build_flat.wall:.2f} | {index_bytes(ours) / 2**20:.0f} |")
    lines.append(f"| FAISS IndexFlatIP | {med['FAISS IndexFlatIP']:.0f} | {rec_ref:.3f} | {build_ref.wall:.2f} | {n * DIM * 4 / 2**20:.0f} |")
    lines.append(f"| torch matmul + top-k (plain, (N, D) rows) | {med['torch matmul+topk']:.0f} | 1.000 | - | {n * DIM * 4 / 2**20:.0f} |")
    lines.append(f"| torch matmul + top-k ((D, N) columns, its fast layout) | {med['torch matmul+topk (D, N)']:.0f} | "
                 f"1.000 | - | {n * DIM * 4 / 2**20:.0f} |")
    lines.append(f"| not exact, for reference: torch bf16 matmul + top-k ((D, N)) | {med['torch bf16']:.0f} | "
                 f"{rec_bf16:.3f} | - | {n * DIM * 2 / 2**20:.0f} |")
    ratio = med['ours flat'] / best_anchor
    lines.append(f"\nours / fastest anchor ({best_name}) = **{ratio:.2f}x** (per round: "
                 + ", ".join(f"{a / max(b, c, d):.2f}" for a, b, c, d in zip(
                     qps["ours flat"], *(qps[name] for name in anchors)))
                 + f"); ours / FAISS flat = {med['ours flat'] / med['FAISS IndexFlatIP']:.2f}x.")
    lines.append(f"\nOurs ran its first stage in **{stage.name}** ({stage.reason})"
                 + (f"; per batch of {QUERY_BATCH}: {np.mean([st.from_shortlist for st in stats]):.1f} queries took "
                    f"their candidates from the bf16 top-{max(exact.SHORTLIST_MIN, 2 * K)}, "
                    f"{np.mean([st.full_fp32 for st in stats]):.1f} were scored in full fp32, "
                    f"{np.mean([st.rescored for st in stats]) / QUERY_BATCH:.0f} fp32 rescorings per query."
                    if two_stage else ".") + bound_line)
    if verdicts is not None:
        verdicts.append(Verdict(f"exact search, {n:,} {data_kind} vectors: ours / fastest of FAISS flat and torch "
                                "(both layouts)", ">= 1.0", f"{ratio:.2f}x (vs {best_name})", ratio >= 1.0, claim="7"))
    print("\n".join(lines[-2:]), flush=True)
    if small_batches:
        small_batch_rows({name: fns[name] for name in ("ours flat", *anchors)}, anchors, q, rounds, n, data_kind,
                         lines)
    del x_t, x_cols, x_bf16, fns
    if not approx:
        del ref
        return
    x = x.copy()  # our own copy before FAISS's storage (which x views) is freed
    del ref
    lines.append(f"\n### {n:,} vectors, {data_kind}: approximate kinds\n")
    lines.append("| kind | setting | q/s (median) | recall@10 | build s (CPU s) | memory MB |")
    lines.append("|---|---|---:|---:|---:|---:|")
    lines.append(f"| flat (exact) | - | {med['ours flat']:.0f} | {rec_ours:.3f} | {build_flat.wall:.2f} | {index_bytes(ours) / 2**20:.0f} |")
    del ours
    print(f"[{n:,} {data_kind}] building hnsw", flush=True)
    with Timer() as build_h:
        h = Index.build(x, kind="hnsw")
    if approx_log is not None:
        approx_log.setdefault("hnsw_build", {})[n] = (build_h.wall, build_h.cpu)
    for ef in ef_values:
        h.params.hnsw_ef_search = ef
        h.search(q[:QUERY_BATCH], K)
        vals = [time_qps(searcher(h), q) for _ in range(rounds)]
        rec = recall(h.search(q, K)[0], truth)
        if approx_log is not None:
            approx_log.setdefault("hnsw_recall", {}).setdefault(ef, {})[n] = (rec, float(np.median(vals)))
        lines.append(f"| hnsw (M={h.params.hnsw_m}, efC={h.params.hnsw_ef_construction}) | efSearch={ef}"
                     f"{' (default)' if ef == IndexParams().hnsw_ef_search else ''} | {np.median(vals):.0f} | "
                     f"{rec:.3f} | {build_h.wall:.1f} ({build_h.cpu:.0f}) | {index_bytes(h) / 2**20:.0f} |")
        print(lines[-1], flush=True)
    del h
    if not ivfpq:
        return
    print(f"[{n:,} {data_kind}] building ivfpq", flush=True)
    with Timer() as build_v:
        v = Index.build(x, kind="ivfpq")
    default_nprobe = v._store.nprobe()
    for nprobe in sorted({16, 32, default_nprobe}):
        v.params.ivf_nprobe = nprobe
        v.search(q[:QUERY_BATCH], K)
        vals = [time_qps(searcher(v), q) for _ in range(rounds)]
        lines.append(f"| ivfpq (nlist={faiss.extract_index_ivf(v._store.index).nlist}, PQ{DIM // 8}x8) | "
                     f"nprobe={nprobe}{' (default)' if nprobe == default_nprobe else ''} | {np.median(vals):.0f} | "
                     f"{recall(v.search(q, K)[0], truth):.3f} | {build_v.wall:.1f} ({build_v.cpu:.0f}) | {index_bytes(v) / 2**20:.0f} |")
        print(lines[-1], flush=True)


def extrapolate_hnsw(log: dict, target: int, lines: list[str]) -> None:
    """Build time and recall of hnsw at ``target`` items, extrapolated (linear in log2 N) from the
    two largest measured sizes. An estimate, printed as such."""
    sizes = sorted(log.get("hnsw_build", {}))
    if len(sizes) < 2:
        return
    a, b = sizes[-2], sizes[-1]
    steps = np.log2(target / b) / np.log2(b / a)
    cpu_a, cpu_b = log["hnsw_build"][a][1] / a, log["hnsw_build"][b][1] / b   # CPU s per vector
    cpu_t = max(cpu_b, cpu_b + (cpu_b - cpu_a) * steps) * target
    lines.append(f"\n### hnsw at {target:,} items (`kind='auto'` picks `{resolve_kind('auto', target)}` there): "
                 f"**extrapolated** from {a:,} and {b:,}, not measured\n")
    lines.append(f"Build: ~{cpu_t / 60:.0f} CPU-minutes (CPU s per vector {1000 * cpu_a:.2f} ms at {a:,}, "
                 f"{1000 * cpu_b:.2f} ms at {b:,}, continued linearly in log N), i.e. ~{cpu_t / 120:.0f} minutes on 2 "
                 f"idle cores. Recall@10 falls with N at a fixed efSearch; continuing the measured fall:\n")
    lines.append(f"| efSearch | recall@10 at {a:,} | at {b:,} | at {target:,} (extrapolated) |")
    lines.append("|---:|---:|---:|---:|")
    for ef, by_n in sorted(log.get("hnsw_recall", {}).items()):
        if a in by_n and b in by_n:
            ra, rb = by_n[a][0], by_n[b][0]
            lines.append(f"| {ef}{' (default)' if ef == IndexParams().hnsw_ef_search else ''} | {ra:.3f} | {rb:.3f} | "
                         f"{min(1.0, rb + (rb - ra) * steps):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k vectors (1000 queries; 500 otherwise)")
    ap.add_argument("--full", action="store_true",
                    help="exact search over 1M vectors and hnsw / ivfpq at 100k and 200k (see above)")
    ap.add_argument("--approx-n", type=int, default=0,
                    help="vectors for the hnsw / ivfpq builds (default 50k, 20k with --quick; 200k matches the issue)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5 for a verdict)")
    ap.add_argument("--scale", action="store_true",
                    help="IVF-PQ built from float16 parts under --budget: peak RSS, recall@10, mmap load")
    ap.add_argument("--scale-n", type=int, default=1_000_000, help="vectors for --scale (default 1M)")
    ap.add_argument("--budget", default="1G", help="memory budget for --scale (default 1G)")
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".cache" / "scale"),
                    help="folder where --scale keeps its parts and exact top-10 between runs (default bench/.cache/scale)")
    args = ap.parse_args()
    if args.scale:
        from retrieval_scale import run_scale

        run_scale(args.scale_n, args.budget, num_queries=200 if args.quick else 500, threads=args.threads,
                  cache=Path(args.cache))
        return
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, DIM), dtype=np.float32)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    lines: list[str] = []
    verdicts: list[Verdict] = []
    n_main = 20_000 if args.quick else 100_000
    n_approx = args.approx_n or (20_000 if args.quick else 50_000)
    num_q = 1000 if args.quick else 500
    run_size(n_main, "random", args.rounds, num_q, approx=False, ef_values=(), rng=rng, basis=basis, lines=lines,
             verdicts=verdicts, small_batches=True)
    if not args.full:  # --full measures 100k low-rank below, with the approximate kinds
        run_size(n_main, "lowrank", args.rounds, num_q, approx=n_main == n_approx, ef_values=(64, 128, 256),
                 rng=rng, basis=basis, lines=lines, verdicts=verdicts, small_batches=True)
    if n_approx != n_main and not args.full:
        run_size(n_approx, "lowrank", args.rounds, num_q, approx=True, ef_values=(64, 128, 256),
                 rng=rng, basis=basis, lines=lines)
    if args.full:
        for kind in ("random", "lowrank"):
            run_size(1_000_000, kind, args.rounds, 200, approx=False, ef_values=(), rng=rng, basis=basis, lines=lines,
                     verdicts=verdicts)
        log: dict = {}
        for n in (100_000, 200_000):  # ivfpq only at 100k: its training is slow and its recall far below 0.95
            run_size(n, "lowrank", args.rounds, 300, approx=True, ef_values=(64, 128, 256), rng=rng, basis=basis,
                     lines=lines, approx_log=log, ivfpq=n == 100_000)
        extrapolate_hnsw(log, 1_000_000, lines)
    total = time.perf_counter() - start
    facts = machine(load_before)
    head = [
        "# Retrieval: search speed and recall",
        "",
        f"Command: `{command_line('retrieval.py')}`",
        "",
        facts.line(),
        "",
        f"fp32, {args.threads} threads, faiss {faiss.__version__}. Median of {args.rounds} rounds; within a round the "
        "exact methods take turns batch by batch, rotating who goes first; queries are new vectors from the same "
        "distribution; recall@10 against exact search. The anchors run at their best: FAISS `IndexFlatIP` (its BLAS "
        "path for batches of queries) and plain fp32 torch matmul + top-k on both layouts ((N, D) rows and (D, N) "
        "columns, MKL's fast one), all exact; the verdict compares against the fastest. A bf16 torch matmul + top-k "
        "is shown for reference only: it is not exact (its recall is below 1 where bf16 rounding reorders the top). "
        f"`Index(kind='auto')` picks `flat` below {AUTO_APPROX_THRESHOLD:,} items and `hnsw` "
        f"(efSearch={IndexParams().hnsw_ef_search}) above. Total {total:.0f} s.",
    ]
    write_results("retrieval", "\n".join(head + lines), verdicts, facts, command_line("retrieval.py"))
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
