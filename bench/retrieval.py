"""Search benchmark: our Index kinds vs FAISS IndexFlatIP and a plain torch matmul + top-k.

Queries/s (batches of 100 queries), recall@10 against exact search, build time and memory for
normalised 512-d vectors, random and low-rank (like real embeddings). Interleaved rounds, medians,
2 threads. Writes bench/results/retrieval.md.

    .venv/bin/python bench/retrieval.py            # 100k vectors (default, a few minutes)
    .venv/bin/python bench/retrieval.py --quick    # 20k vectors
    .venv/bin/python bench/retrieval.py --full     # also exact search over 1M vectors (~2 GB per copy)
    .venv/bin/python bench/retrieval.py --approx-n 200000   # hnsw / ivfpq at 200k (slow builds on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.backends import IndexParams  # noqa: E402
from retrieval.index import AUTO_APPROX_THRESHOLD, Index  # noqa: E402

DIM, K, QUERY_BATCH = 512, 10, 100


def make_vectors(n: int, kind: str, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    """Unit vectors: ``random`` Gaussian, or ``lowrank``: 64 latent factors with a decaying spectrum + noise."""
    if kind == "random":
        x = rng.standard_normal((n, DIM), dtype=np.float32)
    else:
        r = basis.shape[0]
        z = rng.standard_normal((n, r), dtype=np.float32) * np.linspace(1.0, 0.1, r, dtype=np.float32)
        x = z @ basis + 0.05 * np.sqrt(r / DIM) * rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, k, dim=1).indices.numpy()


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def torch_plain(x_t: torch.Tensor, q: np.ndarray, k: int):
    return torch.topk(torch.from_numpy(q) @ x_t.T, k, dim=1)


def time_qps(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    for s in range(0, len(queries), QUERY_BATCH):
        fn(queries[s:s + QUERY_BATCH])
    return len(queries) / (time.perf_counter() - t)


def index_bytes(index: Index) -> int:
    store = index._store
    if index.kind == "flat":
        return store.vectors.nbytes
    return int(faiss.serialize_index(store.index).nbytes)


def run_size(n: int, data_kind: str, rounds: int, num_queries: int, approx: bool, ef_values, rng, basis, lines):
    x = make_vectors(n, data_kind, rng, basis)
    q = make_vectors(num_queries, data_kind, rng, basis)
    truth = exact_topk(x, q, K)
    print(f"[{n:,} {data_kind}] exact search", flush=True)

    t = time.perf_counter(); ours = Index.build(x, kind="flat"); build_flat = time.perf_counter() - t
    t = time.perf_counter(); ref = faiss.IndexFlatIP(DIM); ref.add(x); build_ref = time.perf_counter() - t
    x_t = torch.from_numpy(x)
    fns = {"ours flat": lambda b: ours.search(b, K), "FAISS IndexFlatIP": lambda b: ref.search(b, K),
           "torch matmul+topk": lambda b: torch_plain(x_t, b, K)}
    for fn in fns.values():
        fn(q[:QUERY_BATCH])  # warm-up
    qps = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            qps[name].append(time_qps(fn, q))
    med = {name: float(np.median(v)) for name, v in qps.items()}
    rec_ours = recall(ours.search(q, K)[0], truth)
    rec_ref = recall(ref.search(q, K)[1], truth)
    best_anchor = max(med["FAISS IndexFlatIP"], med["torch matmul+topk"])
    lines.append(f"\n### {n:,} vectors, {data_kind}: exact search ({num_queries} queries in batches of {QUERY_BATCH})\n")
    lines.append("| method | q/s (median) | recall@10 | build s | memory MB |")
    lines.append("|---|---:|---:|---:|---:|")
    lines.append(f"| ours `flat` (chunked torch matmul + top-k) | {med['ours flat']:.0f} | {rec_ours:.3f} | {build_flat:.2f} | {index_bytes(ours) / 2**20:.0f} |")
    lines.append(f"| FAISS IndexFlatIP | {med['FAISS IndexFlatIP']:.0f} | {rec_ref:.3f} | {build_ref:.2f} | {x.nbytes / 2**20:.0f} |")
    lines.append(f"| torch matmul + top-k (plain) | {med['torch matmul+topk']:.0f} | 1.000 | - | {x.nbytes / 2**20:.0f} |")
    lines.append(f"\nours / faster anchor = **{med['ours flat'] / best_anchor:.2f}x**; "
                 f"ours / FAISS flat = {med['ours flat'] / med['FAISS IndexFlatIP']:.2f}x.")
    print(lines[-1], flush=True)
    del ref
    if not approx:
        return
    lines.append(f"\n### {n:,} vectors, {data_kind}: approximate kinds\n")
    lines.append("| kind | setting | q/s (median) | recall@10 | build s | memory MB |")
    lines.append("|---|---|---:|---:|---:|---:|")
    lines.append(f"| flat (exact) | - | {med['ours flat']:.0f} | {rec_ours:.3f} | {build_flat:.2f} | {index_bytes(ours) / 2**20:.0f} |")
    del ours
    print(f"[{n:,} {data_kind}] building hnsw", flush=True)
    t = time.perf_counter(); h = Index.build(x, kind="hnsw"); build_h = time.perf_counter() - t
    for ef in ef_values:
        h.params.hnsw_ef_search = ef
        h.search(q[:QUERY_BATCH], K)
        vals = [time_qps(lambda b: h.search(b, K), q) for _ in range(rounds)]
        lines.append(f"| hnsw (M={h.params.hnsw_m}, efC={h.params.hnsw_ef_construction}) | efSearch={ef}"
                     f"{' (default)' if ef == IndexParams().hnsw_ef_search else ''} | {np.median(vals):.0f} | "
                     f"{recall(h.search(q, K)[0], truth):.3f} | {build_h:.1f} | {index_bytes(h) / 2**20:.0f} |")
        print(lines[-1], flush=True)
    del h
    print(f"[{n:,} {data_kind}] building ivfpq", flush=True)
    t = time.perf_counter(); v = Index.build(x, kind="ivfpq"); build_v = time.perf_counter() - t
    for nprobe in (16, 32):
        v.params.ivf_nprobe = nprobe
        v.search(q[:QUERY_BATCH], K)
        vals = [time_qps(lambda b: v.search(b, K), q) for _ in range(rounds)]
        lines.append(f"| ivfpq (nlist={faiss.extract_index_ivf(v._store.index).nlist}, PQ{DIM // 8}x8) | "
                     f"nprobe={nprobe}{' (default)' if nprobe == IndexParams().ivf_nprobe else ''} | {np.median(vals):.0f} | "
                     f"{recall(v.search(q, K)[0], truth):.3f} | {build_v:.1f} | {index_bytes(v) / 2**20:.0f} |")
        print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k vectors, fewer queries")
    ap.add_argument("--full", action="store_true", help="also exact search over 1M vectors (~2 GB per copy)")
    ap.add_argument("--approx-n", type=int, default=0,
                    help="vectors for the hnsw / ivfpq builds (default 50k, 20k with --quick; 200k matches the issue)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, DIM), dtype=np.float32)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    lines: list[str] = []
    n_main = 20_000 if args.quick else 100_000
    n_approx = args.approx_n or (20_000 if args.quick else 50_000)
    num_q = 300 if args.quick else 500
    run_size(n_main, "random", args.rounds, num_q, approx=False, ef_values=(), rng=rng, basis=basis, lines=lines)
    run_size(n_main, "lowrank", args.rounds, num_q, approx=n_main == n_approx, ef_values=(64, 128, 256),
             rng=rng, basis=basis, lines=lines)
    if n_approx != n_main:
        run_size(n_approx, "lowrank", args.rounds, num_q, approx=True, ef_values=(64, 128, 256),
                 rng=rng, basis=basis, lines=lines)
    if args.full:
        for kind in ("random", "lowrank"):
            run_size(1_000_000, kind, max(1, args.rounds - 1), 500, approx=False, ef_values=(),
                     rng=rng, basis=basis, lines=lines)
    total = time.perf_counter() - start
    cmd = " ".join([".venv/bin/python", "bench/retrieval.py"] + sys.argv[1:])
    head = [
        "# Retrieval: search speed and recall",
        "",
        f"Command: `{cmd}`",
        "",
        f"fp32, {args.threads} threads, torch {torch.__version__}, faiss {faiss.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs. Median of {args.rounds} interleaved rounds; queries are "
        f"new vectors from the same distribution; recall@10 against exact search. `Index(kind='auto')` picks "
        f"`flat` below {AUTO_APPROX_THRESHOLD:,} items and `hnsw` (efSearch={IndexParams().hnsw_ef_search}) above. "
        f"**The machine was shared with other jobs while this ran** (1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after), so absolute figures are noisy; the ratios are side by side. "
        f"Total {total:.0f} s.",
    ]
    out = ROOT / "bench" / "results" / "retrieval.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
