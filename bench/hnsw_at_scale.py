"""Recall@10 of the approximate index that ``Index(kind="auto")`` picks at 1M items, measured.

bench/retrieval.py --full extrapolates the HNSW recall at 1M from 100k and 200k builds because the
1M build (~20 CPU-minutes) does not fit in its run; this script does that one build and measures
recall@10 against exact search on 1M low-rank normalised 512-d vectors (the same generator and seed
family), at efSearch 64 / 128 / 256 (the default). Recall is a quality figure, so the machine's
load changes only the build time and queries/s printed beside it. Goal: recall@10 >= 0.95 at the
default efSearch for the kind ``auto`` picks above ~200k items. Writes bench/results/hnsw_at_scale.md
and .json (``hnsw_at_scale_<n>`` for other sizes) through ``bench/_report.write_results``.

    .venv/bin/python bench/hnsw_at_scale.py                 # 1M (about 10-20 min on 2 cores, ~5 GB)
    .venv/bin/python bench/hnsw_at_scale.py --n 200000      # a quicker check
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from _report import Verdict, command_line, machine, write_results  # noqa: E402
from retrieval import Index  # noqa: E402
from retrieval import backends  # noqa: E402
from retrieval.index import resolve_kind  # noqa: E402


def _retrieval_bench():
    """bench/retrieval.py as a module (its name would shadow the ``retrieval`` package on sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_retrieval", BENCH / "retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rb = _retrieval_bench()
GOAL = 0.95
DIM, K, Timer, exact_topk, make_vectors, recall = _rb.DIM, _rb.K, _rb.Timer, _rb.exact_topk, _rb.make_vectors, _rb.recall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (default 1M)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, DIM), dtype=np.float32)
    x = make_vectors(args.n, "lowrank", rng, basis)
    q = make_vectors(args.queries, "lowrank", rng, basis)
    with Timer() as exact_t:
        truth = exact_topk(x, q, K)
    kind = resolve_kind("auto", args.n)
    print(f"[{args.n:,}] kind='auto' picks {kind!r}; building", flush=True)
    with Timer() as build:
        index = Index.build(x, kind="auto")
    default_ef = backends.IndexParams().hnsw_ef_search
    rows = []
    for ef in (64, 128, 256):
        index.params.hnsw_ef_search = ef
        t = time.perf_counter()
        ids, _ = index.search(q, K)
        qps = len(q) / (time.perf_counter() - t)
        rows.append((ef, recall(ids, truth), qps))
        print(f"efSearch {ef}: recall@10 {rows[-1][1]:.3f}, {qps:.0f} q/s", flush=True)
    facts = machine(load_before)
    met = dict((e, r) for e, r, _ in rows)[default_ef]
    lines = [
        "# HNSW recall at scale (measured, not extrapolated)",
        "",
        f"Command: `{command_line('hnsw_at_scale.py')}`",
        "",
        facts.line() + " Build time and q/s depend on the load; recall does not.",
        "",
        f"{args.n:,} low-rank normalised {DIM}-d vectors (bench/retrieval.py's generator), {len(q)} queries, "
        f"recall@10 against exact search (torch matmul + top-k, {len(q) / exact_t.wall:.0f} q/s here). "
        f"`Index(kind='auto')` picked **`{kind}`**. Build: {build.wall:.0f} s wall, {build.cpu:.0f} CPU-s "
        f"({args.threads} threads).",
        "",
        "| efSearch | recall@10 | q/s (one pass, batches of all queries) |",
        "|---:|---:|---:|",
        *[f"| {ef}{' (default)' if ef == default_ef else ''} | {r:.3f} | {qps:.0f} |" for ef, r, qps in rows],
    ]
    verdicts = [Verdict(f"recall@10 of Index(kind='auto') ({kind}) at {args.n:,} x {DIM}, default efSearch {default_ef}",
                        f">= {GOAL}", f"{met:.3f}", met >= GOAL)]
    name = "hnsw_at_scale" if args.n >= 1_000_000 else f"hnsw_at_scale_{args.n}"
    write_results(name, "\n".join(lines), verdicts, facts, command_line("hnsw_at_scale.py"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
