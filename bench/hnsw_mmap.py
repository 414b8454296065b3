"""Opening a saved HNSW index memory-mapped (``Index.load(folder, mmap=True)``) against reading it.

Builds (once, cached under ``--work``) an HNSW index of ``--n`` random unit ``--dim``-d vectors, then
opens it ``--rounds`` times in each mode, in rotated order, each open in a fresh process: ``read``
(``mmap=False``: the graph and vectors read into memory) and ``mapped`` (``mmap=True``). Per open it
records the open time, the process's resident memory added by the open (anonymous and file-backed
pages) and, for ``--queries`` queries searched twice, queries/s of the first pass (which pages a mapped
index in) and of the second, and the memory added once searched. Both modes read the same file, so
after the first round it sits in the page cache: the figures compare the two ways of opening it, not
the disk. Goals (a mapped open is worth having): mapped / read open time <= 0.5, mapped / read memory
added by the open <= 0.5, mapped / read second-pass queries/s >= 0.95 (searching is not slowed).
Writes bench/results/hnsw_mmap.md and .json.

    .venv/bin/python bench/hnsw_mmap.py                      # 200k x 128 (the build takes a few minutes once)
    .venv/bin/python bench/hnsw_mmap.py --n 20000 --rounds 5 # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from _report import Verdict, command_line, machine, write_results  # noqa: E402

MODES = ("read", "mapped")
GOAL_OPEN, GOAL_MEMORY, GOAL_SEARCH = 0.5, 0.5, 0.95


def _rss_mb() -> dict[str, float]:
    """Resident memory of this process in MiB: total, anonymous, file-backed (Linux /proc)."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def child(mode: str, folder: str, queries: int, dim: int, threads: int) -> dict:
    """One open of ``folder`` in ``mode`` in this (fresh) process, then two passes of searches."""
    import faiss

    from retrieval import Index

    faiss.omp_set_num_threads(threads)
    q = np.random.default_rng(1).standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    before = _rss_mb()
    t = time.perf_counter()
    index = Index.load(folder, mmap=mode == "mapped")
    open_s = time.perf_counter() - t
    opened = _rss_mb()
    passes = []
    for _ in range(2):
        t = time.perf_counter()
        ids, _ = index.search(q, 10)
        passes.append(queries / (time.perf_counter() - t))
    searched = _rss_mb()
    return {"mode": mode, "open_s": open_s, "qps_first": passes[0], "qps_second": passes[1],
            "open_mb": {k: opened[k] - before[k] for k in before}, "searched_mb": {k: searched[k] - before[k] for k in before},
            "ids_head": ids[:4, :3].tolist()}


def build(folder: Path, n: int, dim: int) -> float:
    """Build and save the index once (seconds spent; 0 when cached)."""
    from retrieval import Index

    if (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("count") == n and manifest.get("embedding_dim") == dim and manifest.get("kind") == "hnsw":
            return 0.0
    x = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    print(f"building an HNSW index of {n:,} x {dim} (once)", flush=True)
    t = time.perf_counter()
    Index.build(x, kind="hnsw").save(folder)
    return time.perf_counter() - t


def _median(rows: list[dict], key) -> float:
    return float(np.median([key(r) for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="opens per mode, rotated order (at least 5 for a verdict)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(BENCH / ".cache" / "hnsw_mmap"), help="where the index is cached")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.queries, args.dim, args.threads)))
        return
    load_before = os.getloadavg()[0]
    folder = Path(args.work) / f"hnsw_{args.n}x{args.dim}"
    build_s = build(folder, args.n, args.dim)
    rows: list[dict] = []
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), "--queries", str(args.queries),
                                  "--dim", str(args.dim), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    if by["read"][0]["ids_head"] != by["mapped"][0]["ids_head"]:
        raise SystemExit("the mapped and the read index return different results")
    med = {m: {"open_s": _median(by[m], lambda r: r["open_s"]),
               "open_mb": _median(by[m], lambda r: r["open_mb"]["VmRSS"]),
               "open_anon": _median(by[m], lambda r: r["open_mb"]["RssAnon"]),
               "searched_mb": _median(by[m], lambda r: r["searched_mb"]["VmRSS"]),
               "qps_first": _median(by[m], lambda r: r["qps_first"]),
               "qps_second": _median(by[m], lambda r: r["qps_second"])} for m in MODES}
    open_ratio = med["mapped"]["open_s"] / med["read"]["open_s"]
    mem_ratio = med["mapped"]["open_mb"] / max(med["read"]["open_mb"], 1e-9)
    search_ratio = med["mapped"]["qps_second"] / med["read"]["qps_second"]
    facts = machine(load_before)
    vectors_mb = args.n * args.dim * 4 / 2**20
    what = f"HNSW {args.n:,} x {args.dim}"
    verdicts = [
        Verdict(f"{what}: open time, mmap=True / mmap=False (medians of {args.rounds} fresh processes each)",
                f"<= {GOAL_OPEN}", f"{open_ratio:.3f}x ({med['mapped']['open_s'] * 1e3:.0f} / "
                f"{med['read']['open_s'] * 1e3:.0f} ms)", open_ratio <= GOAL_OPEN),
        Verdict(f"{what}: resident memory added by the open, mmap=True / mmap=False",
                f"<= {GOAL_MEMORY}", f"{mem_ratio:.3f}x ({med['mapped']['open_mb']:.0f} / {med['read']['open_mb']:.0f} MiB)",
                mem_ratio <= GOAL_MEMORY),
        Verdict(f"{what}: search q/s once warm (second pass of {args.queries} queries), mmap=True / mmap=False",
                f">= {GOAL_SEARCH}", f"{search_ratio:.3f}x", search_ratio >= GOAL_SEARCH),
    ]
    lines = [
        "# Opening an HNSW index memory-mapped",
        "",
        f"Command: `{command_line('hnsw_mmap.py')}`",
        "",
        facts.line(),
        "",
        f"{args.n:,} random unit {args.dim}-d vectors ({vectors_mb:.0f} MiB of vectors), `Index.build(kind='hnsw')`"
        f"{f', built in {build_s:.0f} s' if build_s else ' (cached build)'}. Each open in a fresh process, "
        f"{args.rounds} per mode in rotated order; {args.threads} FAISS threads; the file is in the page cache "
        "after the first open. Memory: the process's resident set added (anonymous + file-backed pages).",
        "",
        "| mode | open ms | MiB after open (anon) | q/s first pass | q/s second pass | MiB after both passes |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| `mmap={m == 'mapped'}` | {med[m]['open_s'] * 1e3:.1f} | {med[m]['open_mb']:.1f} ({med[m]['open_anon']:.1f}) | "
          f"{med[m]['qps_first']:.0f} | {med[m]['qps_second']:.0f} | {med[m]['searched_mb']:.1f} |" for m in MODES],
        "",
        *[f"- {v.what}: goal {v.goal}, measured {v.measured}: **{'met' if v.met else 'missed'}**" for v in verdicts],
    ]
    write_results("hnsw_mmap", "\n".join(lines), verdicts, facts, command_line("hnsw_mmap.py"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
