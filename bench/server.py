"""Server benchmark: throughput and latency with dynamic batching on vs off, 1 / 8 / 32 clients.

Two `ernie-vl serve` processes on loopback (max_batch_size 32 vs 1) with the same model (default:
the ErnieVL ``tiny`` preset, random init, saved to a temporary checkpoint) and a
10k-item flat index; a load generator (asyncio + httpx, in this process) keeps C requests in flight
for a fixed time per round, alternating the servers each round. Requests: ``POST /search`` with a
short text. Writes bench/results/server.md.

    .venv/bin/python bench/server.py           # ~3 minutes
    .venv/bin/python bench/server.py --model open_clip:ViT-B-32
    .venv/bin/python bench/server.py --quick   # shorter rounds
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ernie_vl.hub import load_model  # noqa: E402
from ernie_vl.serve.runner import free_port  # noqa: E402
from retrieval.index import Index  # noqa: E402

JSON_HEADERS = {"content-type": "application/json"}
WORDS = "dog cat beach city night snow red blue car tree river person bike food mountain".split()


def start_server(spec: str, index_dir: Path, max_batch: int, wait_ms: float, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ernie_vl", "serve", spec, "--index", str(index_dir), "--port", str(port),
           "--max-batch-size", str(max_batch), "--max-wait-ms", str(wait_ms), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not start in {timeout_s} s")


async def load(url: str, clients: int, duration_s: float, seed: int) -> dict:
    """Keep ``clients`` requests in flight for ``duration_s``; returns throughput and latencies."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def worker(client: httpx.AsyncClient, wid: int) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < stop_at:
            text = f"a {WORDS[rng.integers(len(WORDS))]} and a {WORDS[rng.integers(len(WORDS))]} {wid}-{n}"
            body = json.dumps({"text": text, "k": 10}).encode()
            t = time.perf_counter()
            try:
                r = await client.post("/search", content=body, headers=JSON_HEADERS)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
            n += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = (await client.get("/health")).json()["stats"]["text"]
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, w) for w in range(clients)))
        elapsed = time.perf_counter() - start
        after = (await client.get("/health")).json()["stats"]["text"]
    batches = after["batches"] - before["batches"]
    return {"requests": len(latencies), "errors": errors, "elapsed": elapsed, "latencies": latencies,
            "mean_batch": (after["items"] - before["items"]) / batches if batches else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:tiny",
                    help="preset:NAME (an ErnieVL preset, random init, saved to a temporary checkpoint) or a "
                         "model spec such as open_clip:ViT-B-32 (default preset:tiny)")
    ap.add_argument("--quick", action="store_true", help="5 s rounds, 1 round per setting")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 5.0, 1
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model
        if spec.startswith("preset:"):
            import ernie_vl

            torch.manual_seed(0)
            ernie_vl.create_model(spec[len("preset:"):]).save_pretrained(str(Path(tmp) / "ckpt"))
            spec = str(Path(tmp) / "ckpt")
        loaded = load_model(spec)
        dim = loaded.embedding_dim
        rng = np.random.default_rng(0)
        x = rng.standard_normal((10_000, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index_dir = Index.build(x, kind="flat", model_id=loaded.model_id,
                                metadata=[{"path": f"img{i}.jpg"} for i in range(len(x))]).save(Path(tmp) / "idx")
        del loaded
        servers = {"on": start_server(spec, index_dir, 32, args.max_wait_ms, args.threads),
                   "off": start_server(spec, index_dir, 1, args.max_wait_ms, args.threads)}
        try:
            for proc, url in servers.values():
                wait_ready(proc, url)
            for _, url in servers.values():  # warm-up
                asyncio.run(load(url, 2, 1.0, 0))
            results = {(c, m): [] for c in clients for m in servers}
            for c in clients:
                for r in range(args.rounds):
                    order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
                    for mode in order:
                        res = asyncio.run(load(servers[mode][1], c, args.seconds, seed=r))
                        results[(c, mode)].append(res)
                        print(f"clients={c:2d} batching={mode:3s} round {r}: {res['requests'] / res['elapsed']:.1f} req/s, "
                              f"mean batch {res['mean_batch']:.1f}, errors {res['errors']}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    rows, summary = [], []
    for c in clients:
        stats = {}
        for mode in ("on", "off"):
            runs = results[(c, mode)]
            lat = np.concatenate([np.array(r["latencies"]) for r in runs]) * 1000
            rps = float(np.median([r["requests"] / r["elapsed"] for r in runs]))
            stats[mode] = (rps, lat.mean(), np.percentile(lat, 50), np.percentile(lat, 99))
            rows.append(f"| {c} | {mode} | {rps:.1f} | {lat.mean():.0f} | {np.percentile(lat, 50):.0f} | "
                        f"{np.percentile(lat, 99):.0f} | {np.mean([r['mean_batch'] for r in runs]):.1f} | "
                        f"{sum(r['errors'] for r in runs)} |")
        on, off = stats["on"], stats["off"]
        summary.append(f"| {c} | **{on[0] / off[0]:.2f}x** | {100 * (1 - on[1] / off[1]):+.0f}% | "
                       f"{100 * (1 - on[3] / off[3]):+.0f}% |")
    cmd = " ".join([".venv/bin/python", "bench/server.py"] + sys.argv[1:])
    text = "\n".join([
        "# Server: dynamic batching on vs off",
        "",
        f"Command: `{cmd}`",
        "",
        f"`ernie-vl serve` of `{args.model}` (random init) with a 10k-item flat index, `POST /search` with a short "
        f"text (text embedding + top-10 search). Batching on: max_batch_size 32, max_wait_ms {args.max_wait_ms:g}; "
        f"off: max_batch_size 1 (one forward per request, in arrival order). Both servers run at once on loopback, "
        f"{args.threads} torch threads each, and are loaded in alternating rounds of {args.seconds:g} s "
        f"({args.rounds} per setting; throughput is the median round, latencies pool all rounds). The load "
        f"generator (asyncio + httpx) shares the machine's {os.cpu_count()} CPUs. {platform.machine()}, "
        f"torch {torch.__version__}. **The machine was shared with other jobs while this ran** (1-min load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after). Total {time.perf_counter() - t0:.0f} s.",
        "",
        "| clients | batching | req/s | mean ms | p50 ms | p99 ms | mean batch | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| clients | throughput on/off | mean latency saved | p99 latency saved |",
        "|---:|---:|---:|---:|",
        *summary,
    ])
    out = ROOT / "bench" / "results" / "server.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
