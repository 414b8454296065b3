"""``bench/retrieval.py --scale``: an IVF-PQ index built from embedding parts under a memory budget.

N low-rank 512-d unit vectors (like real embeddings; the generator of bench/retrieval.py) are
written as float16 parts (the ``ernie-vl embed`` format), then ``Index.build_from_parts(kind="ivfpq",
memory_budget=...)`` runs in a child process whose peak RSS is read from the OS. Recall@10 is
measured against brute force over the same stored vectors (exact top-10, computed part by part),
and the saved index is opened with ``Index.load(mmap=True)`` and without, timing both.
Goal: the build's peak RSS above the process's RSS after its imports (torch and faiss alone take
~0.7 GB here) within the budget; the process peak, recall@10 (default nprobe) and load times reported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.index import Index  # noqa: E402
from retrieval.index_parts import parse_memory  # noqa: E402
from retrieval.parts import write_part  # noqa: E402

from _report import Verdict, command_line, machine, write_results  # noqa: E402

PART = 50_000


def make_part(rng: np.random.Generator, basis: np.ndarray, n: int) -> np.ndarray:
    """(n, D) low-rank unit vectors: 64 latent factors with a decaying spectrum, plus noise."""
    r, dim = basis.shape
    z = rng.standard_normal((n, r), dtype=np.float32) * np.linspace(1.0, 0.1, r, dtype=np.float32)
    x = z @ basis + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.05 * np.sqrt(r / dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss_now() -> int:
    """This process's resident set (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's RSS high-water mark (bytes): VmHWM, which starts afresh at exec (``ru_maxrss`` of a
    spawned child can carry its parent's peak on Linux)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def build_child(emb: str, out: str, budget: str) -> None:
    """Runs in a fresh process: build, save, print timings, the RSS after the imports (torch, faiss)
    and the peak RSS of the build (VmHWM) as JSON."""
    base = rss_now()
    start = time.perf_counter()
    index = Index.build_from_parts(emb, kind="ivfpq", memory_budget=budget)
    built = time.perf_counter() - start
    peak_build = peak_rss()
    index.save(out)
    print(json.dumps({"build_s": built, "save_s": time.perf_counter() - start - built, "base_rss": base,
                      "peak_rss": peak_build, "plan": index.info["ivfpq_plan"], "count": len(index)}))


def run_scale(n: int, budget: str, num_queries: int, threads: int) -> None:
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    load_before = os.getloadavg()[0]
    dim = 512
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, dim), dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="ernie-vl-scale-"))
    try:
        emb, out = tmp / "emb", tmp / "index"
        emb.mkdir()
        queries = make_part(np.random.default_rng(99), basis, num_queries).astype(np.float32)
        best_s = np.full((num_queries, 10), -np.inf, np.float32)
        best_i = np.full((num_queries, 10), -1, np.int64)
        t0 = time.perf_counter()
        for s, start in enumerate(range(0, n, PART)):
            x = make_part(rng, basis, min(PART, n - start)).astype(np.float16)
            rows = [{"id": start + i, "path": f"img/{start + i:08d}.jpg"} for i in range(len(x))]
            write_part(emb, 0, s, start, start + len(x), x, rows, [], "bench:lowrank", "float16")
            scores = queries @ x.astype(np.float32).T       # brute force over the stored (float16) vectors
            cat_s = np.concatenate([best_s, scores], 1)
            cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), scores.shape)], 1)
            order = np.argsort(-cat_s, axis=1)[:, :10]
            best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
        gen_s = time.perf_counter() - t0
        child = subprocess.run([sys.executable, __file__, "--build-child", str(emb), str(out), budget],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if child.returncode:
            raise SystemExit(f"build failed:\n{child.stderr[-3000:]}")
        built = json.loads(child.stdout.strip().splitlines()[-1])
        t = time.perf_counter()
        mapped = Index.load(out, mmap=True)
        mmap_s = time.perf_counter() - t
        t = time.perf_counter()
        full = Index.load(out)
        full_s = time.perf_counter() - t
        got = mapped.search(queries, 10)[0]
        same = np.array_equal(got, full.search(queries, 10)[0])
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, best_i)]))
        t = time.perf_counter()
        for s in range(0, num_queries, 100):
            mapped.search(queries[s:s + 100], 10)
        qps = num_queries / (time.perf_counter() - t)
        disk = sum(p.stat().st_size for p in out.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    limit = parse_memory(budget)
    grown = built["peak_rss"] - built["base_rss"]
    facts = machine(load_before)
    plan = built["plan"]
    lines = [
        "# Retrieval at scale: IVF-PQ from embedding parts under a memory budget",
        "",
        f"Command: `{command_line('retrieval.py')}`",
        "",
        facts.line() + " The machine is shared with other jobs: the times are indicative; RSS, recall and the plan do not depend on the load.",
        "",
        f"{n:,} low-rank 512-d unit vectors in {(n + PART - 1) // PART} float16 parts of {PART:,} "
        f"(written and brute-forced in {gen_s:.0f} s); `Index.build_from_parts(kind='ivfpq', memory_budget='{budget}')` "
        f"in a child process, {threads} threads, faiss {faiss.__version__}. Plan: nlist {plan['nlist']}, PQ{plan['pq_m']}x8, "
        f"trained on {plan['train_size']:,} sampled vectors, estimated {plan['estimated_bytes'] / 2**20:.0f} MiB. "
        f"Recall@10 against brute force over the stored vectors, {num_queries} queries, nprobe {mapped.params.ivf_nprobe}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| build (train + add, part by part) | {built['build_s']:.0f} s |",
        f"| RSS after the imports (torch, faiss), before the build | {built['base_rss'] / 2**20:.0f} MiB |",
        f"| peak RSS of the build process | {built['peak_rss'] / 2**20:.0f} MiB |",
        f"| build's own peak (peak - after imports) | {grown / 2**20:.0f} MiB (budget {limit / 2**20:.0f} MiB) |",
        f"| index on disk | {disk / 2**20:.0f} MiB (the vectors as float32: {n * 512 * 4 / 2**20:.0f} MiB) |",
        f"| recall@10 vs brute force | {recall:.3f} |",
        f"| `Index.load(mmap=True)` / `Index.load()` | {mmap_s:.2f} s / {full_s:.2f} s (same results: {same}) |",
        f"| queries/s (batches of 100, mmap) | {qps:.0f} |",
    ]
    verdicts = [
        Verdict(f"IVF-PQ build from parts, {n:,} x 512, peak RSS above the imports", f"<= {budget} budget",
                f"{grown / 2**20:.0f} MiB (process peak {built['peak_rss'] / 2**20:.0f} MiB)", grown <= limit),
        Verdict(f"IVF-PQ from parts, {n:,} x 512, recall@10 vs brute force", "reported", f"{recall:.3f}", None),
        Verdict(f"Index.load(mmap=True), {n:,} items", "reported", f"{mmap_s:.2f} s (full load {full_s:.2f} s)", None),
    ]
    name = "retrieval_scale" if n >= 1_000_000 else f"retrieval_scale_{n}"
    write_results(name, "\n".join(lines), verdicts, facts, command_line("retrieval.py"))
    print("\n".join(lines))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--build-child":
    build_child(*sys.argv[2:])
