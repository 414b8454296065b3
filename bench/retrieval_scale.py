"""``bench/retrieval.py --scale``: an IVF-PQ index built from embedding parts under a memory budget.

N low-rank 512-d unit vectors (like real embeddings; the generator of bench/retrieval.py) are
written as float16 parts (the ``ernie-vl embed`` format) with the exact top-10 of the queries over
those stored vectors (brute force, part by part); both are cached under ``--cache`` and reused.
Then, each in a fresh child process (its RSS read from the OS):

- build: ``Index.build_from_parts(kind="ivfpq", memory_budget=...)`` and save; peak RSS;
- open ``mmap=True``: open time, RSS after the open, the nprobe x re-rank sweep (recall@10 vs
  queries/s), RSS after the searches;
- open fully: open time, RSS after the open, the default search (ids, names and scores must equal
  the mmap ones).

Goals (computed here): the build's peak above the child's RSS after its imports within the budget;
recall@10 of the default search >= 0.9; the mmap open under a second; the RSS the mmap open adds
at most a tenth of the index on disk.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.backends import NPROBE_FRACTION  # noqa: E402
from retrieval.index import Index  # noqa: E402
from retrieval.index_parts import parse_memory  # noqa: E402
from retrieval.parts import write_part  # noqa: E402

from _report import Verdict, command_line, machine, write_results  # noqa: E402

PART = 50_000
K = 10
NPROBES = (8, 16, 32, 64, 128, 256)
RERANK_FACTORS = (0, 4, 10, 20)          # shortlist = factor * k; 0 = PQ scores only
RECALL_GOAL = 0.9
OPEN_GOAL_S = 1.0
OPEN_RSS_FRACTION = 0.1


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


def prepare(n: int, num_queries: int, cache: Path) -> tuple[Path, np.ndarray, np.ndarray, str]:
    """(EMB folder, queries, exact top-10 ids, how they were obtained); generated once per (n, queries)."""
    folder = cache / f"lowrank-{n}-q{num_queries}"
    emb, truth_file = folder / "emb", folder / "truth.npz"
    if truth_file.is_file():
        saved = np.load(truth_file)
        return emb, saved["queries"], saved["ids"], f"reused from the cache ({saved['gen_s']:.0f} s to make)"
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, 512), dtype=np.float32)
    queries = make_part(np.random.default_rng(99), basis, num_queries).astype(np.float32)
    best_s = np.full((num_queries, K), -np.inf, np.float32)
    best_i = np.full((num_queries, K), -1, np.int64)
    t0 = time.perf_counter()
    for s, start in enumerate(range(0, n, PART)):
        x = make_part(rng, basis, min(PART, n - start)).astype(np.float16)
        rows = [{"id": start + i, "path": f"img/{start + i:08d}.jpg"} for i in range(len(x))]
        write_part(emb, 0, s, start, start + len(x), x, rows, [], "bench:lowrank", "float16")
        scores = queries @ x.astype(np.float32).T       # brute force over the stored (float16) vectors
        cat_s = np.concatenate([best_s, scores], 1)
        cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), scores.shape)], 1)
        order = np.argsort(-cat_s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
        print(f"  parts: {start + len(x):,} / {n:,}", flush=True)
    gen_s = time.perf_counter() - t0
    np.savez(truth_file, queries=queries, ids=best_i, gen_s=gen_s)
    return emb, queries, best_i, f"written and brute-forced in {gen_s:.0f} s"


def build_child(emb: str, out: str, budget: str) -> None:
    """Fresh process: build, save; timings, RSS after the imports and the build's peak RSS as JSON."""
    base = rss_now()
    start = time.perf_counter()
    index = Index.build_from_parts(emb, kind="ivfpq", memory_budget=budget)
    built = time.perf_counter() - start
    peak_build = peak_rss()
    index.save(out)
    print(json.dumps({"build_s": built, "save_s": time.perf_counter() - start - built, "base_rss": base,
                      "peak_rss": peak_build, "plan": index.info["ivfpq_plan"], "count": len(index)}))


def open_child(out: str, mode: str, queries_file: str, result_file: str) -> None:
    """Fresh process: open (mmap or full), RSS after the open; the default search's ids, scores and names; with
    mmap also the nprobe x re-rank sweep (ids and queries/s)."""
    import faiss

    queries = np.load(queries_file)
    base = rss_now()
    t = time.perf_counter()
    index = Index.load(out, mmap=(mode == "mmap"))
    open_s = time.perf_counter() - t
    opened = rss_now()
    ids, scores = index.search(queries, K)
    names = np.array([[index.metadata(i)["path"] if i >= 0 else "" for i in row] for row in ids])
    store = index._store
    report = {"open_s": open_s, "base_rss": base, "open_rss": opened, "nlist": store.nlist,
              "default_nprobe": store.nprobe(), "rerank_factor": index.params.rerank_factor, "sweep": []}
    arrays = {"ids": ids, "scores": scores, "names": names}
    if mode == "mmap":
        for nprobe in [p for p in NPROBES if p <= store.nlist]:
            for factor in RERANK_FACTORS:
                t = time.perf_counter()
                got = np.concatenate([index.search(queries[s:s + 100], K, rerank=factor * K, nprobe=nprobe)[0]
                                      for s in range(0, len(queries), 100)])
                qps = len(queries) / (time.perf_counter() - t)
                arrays[f"sweep_{nprobe}_{factor}"] = got
                report["sweep"].append({"nprobe": nprobe, "factor": factor, "qps": qps})
        t = time.perf_counter()
        for s in range(0, len(queries), 100):
            index.search(queries[s:s + 100], K)
        report["default_qps"] = len(queries) / (time.perf_counter() - t)
    report["search_rss"] = rss_now()
    report["faiss"] = faiss.__version__
    np.savez(result_file, **arrays)
    print(json.dumps(report))


def _child(args: list[str], threads: int) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if run.returncode:
        raise SystemExit(f"{args[0]} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, truth)]))


def run_scale(n: int, budget: str, num_queries: int, threads: int, cache: Path) -> None:
    load_before = os.getloadavg()[0]
    emb, queries, truth, made = prepare(n, num_queries, cache)
    with tempfile.TemporaryDirectory(prefix="ernie-vl-scale-") as tmp:
        out = Path(tmp) / "index"
        np.save(Path(tmp) / "queries.npy", queries)
        print("  building", flush=True)
        built = _child(["--build-child", str(emb), str(out), budget], threads)
        disk = sum(p.stat().st_size for p in out.iterdir())
        print("  opening memory-mapped, sweeping nprobe x re-rank", flush=True)
        mapped = _child(["--open-child", str(out), "mmap", str(Path(tmp) / "queries.npy"), str(Path(tmp) / "m.npz")],
                        threads)
        full = _child(["--open-child", str(out), "full", str(Path(tmp) / "queries.npy"), str(Path(tmp) / "f.npz")],
                      threads)
        got_m, got_f = dict(np.load(Path(tmp) / "m.npz")), dict(np.load(Path(tmp) / "f.npz"))
    same = all(np.array_equal(got_m[key], got_f[key]) for key in ("ids", "scores", "names"))
    recall = _recall(got_m["ids"], truth)
    limit = parse_memory(budget)
    grown = built["peak_rss"] - built["base_rss"]
    open_added = mapped["open_rss"] - mapped["base_rss"]
    facts = machine(load_before)
    plan = built["plan"]
    default_np, factor = mapped["default_nprobe"], mapped["rerank_factor"]
    sweep_rows = []
    for row in mapped["sweep"]:
        r = _recall(got_m[f"sweep_{row['nprobe']}_{row['factor']}"], truth)
        mark = " (default)" if (row["nprobe"], row["factor"]) == (default_np, factor) else ""
        sweep_rows.append(f"| {row['nprobe']} | {row['factor'] * K if row['factor'] else 'none (PQ scores)'}{mark} | "
                          f"{r:.3f} | {row['qps']:.0f} |")
    lines = [
        "# Retrieval at scale: IVF-PQ from embedding parts under a memory budget",
        "",
        f"Command: `{command_line('retrieval.py')}`",
        "",
        facts.line() + " The machine is shared with other jobs: times and queries/s are indicative; RSS, recall "
        "and the plan do not depend on the load.",
        "",
        f"{n:,} low-rank 512-d unit vectors in {(n + PART - 1) // PART} float16 parts of {PART:,} ({made}); "
        f"`Index.build_from_parts(kind='ivfpq', memory_budget='{budget}')` in a child process, {threads} threads, "
        f"faiss {mapped['faiss']}. Plan: nlist {plan['nlist']}, PQ{plan['pq_m']}x8, trained on "
        f"{plan['train_size']:,} sampled vectors, estimated {plan['estimated_bytes'] / 2**20:.0f} MiB. Recall@10 "
        f"against brute force over the stored vectors, {num_queries} queries. The default search visits "
        f"nprobe = {default_np} lists (nlist/{NPROBE_FRACTION}) and re-ranks the PQ top-{factor * K} exactly against the "
        f"memory-mapped float16 parts.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| build (train + add, part by part) | {built['build_s']:.0f} s |",
        f"| RSS after the imports (torch, faiss), before the build | {built['base_rss'] / 2**20:.0f} MiB |",
        f"| peak RSS of the build process | {built['peak_rss'] / 2**20:.0f} MiB |",
        f"| build's own peak (peak - after imports) | {grown / 2**20:.0f} MiB (budget {limit / 2**20:.0f} MiB) |",
        f"| index on disk | {disk / 2**20:.0f} MiB (the vectors as float32: {n * 512 * 4 / 2**20:.0f} MiB) |",
        f"| recall@10 vs brute force, default search | {recall:.3f} |",
        f"| queries/s, default search (batches of 100, mmap) | {mapped['default_qps']:.0f} |",
        f"| `Index.load(mmap=True)`: open time, RSS it adds | {mapped['open_s']:.3f} s, "
        f"{open_added / 2**20:.1f} MiB |",
        f"| `Index.load()`: open time, RSS it adds | {full['open_s']:.3f} s, "
        f"{(full['open_rss'] - full['base_rss']) / 2**20:.1f} MiB |",
        f"| RSS after the searches (mmap / full), above the imports | "
        f"{(mapped['search_rss'] - mapped['base_rss']) / 2**20:.0f} MiB / "
        f"{(full['search_rss'] - full['base_rss']) / 2**20:.0f} MiB |",
        f"| mmap and full load: same ids, names and scores | {same} |",
        "",
        "nprobe x re-rank sweep (memory-mapped index; queries/s in batches of 100):",
        "",
        "| nprobe | re-ranked shortlist | recall@10 | queries/s |",
        "|---:|---|---:|---:|",
        *sweep_rows,
    ]
    verdicts = [
        Verdict(f"IVF-PQ build from parts, {n:,} x 512, peak RSS above the imports", f"<= {budget} budget",
                f"{grown / 2**20:.0f} MiB (process peak {built['peak_rss'] / 2**20:.0f} MiB)", grown <= limit),
        Verdict(f"IVF-PQ from parts, {n:,} x 512, recall@10 vs brute force (default search)", f">= {RECALL_GOAL}",
                f"{recall:.3f} (nprobe {default_np}, re-rank {factor * K})", recall >= RECALL_GOAL),
        Verdict(f"Index.load(mmap=True), {n:,} items, open time", f"< {OPEN_GOAL_S:.0f} s",
                f"{mapped['open_s']:.3f} s (full load {full['open_s']:.2f} s)", mapped["open_s"] < OPEN_GOAL_S),
        Verdict(f"Index.load(mmap=True), {n:,} items, RSS added by the open",
                f"<= {OPEN_RSS_FRACTION:.0%} of the index on disk ({disk / 2**20:.0f} MiB)",
                f"{open_added / 2**20:.1f} MiB", open_added <= OPEN_RSS_FRACTION * disk and same),
    ]
    name = "retrieval_scale" if n >= 1_000_000 else f"retrieval_scale_{n}"
    write_results(name, "\n".join(lines), verdicts, facts, command_line("retrieval.py"))
    print("\n".join(lines))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--build-child":
    build_child(*sys.argv[2:])
elif __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--open-child":
    open_child(*sys.argv[2:])
