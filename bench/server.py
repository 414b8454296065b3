"""Server benchmark: throughput and latency with dynamic batching on vs off, 1 / 8 / 32 clients.

Two `ernie-vl serve` processes on loopback (max_batch_size 32 vs 1, otherwise the same code) with
the same model and a 10k-item flat index; a load generator (raw asyncio HTTP/1.1 keep-alive
connections on uvloop, in this process) keeps C requests in flight for a fixed time per round,
alternating the servers each round. Requests: ``POST /search`` with a short text (tokenise, text
forward, top-10 search). Default model: the ErnieVL ``base`` preset (random init), where the model
forward dominates, and ``preset:tiny``, where the HTTP path weighs as much. Writes
bench/results/server.md and server.json (``bench/_report.py``) with the verdict per model: at 32
clients, >= 3x the throughput with batching on.

    .venv/bin/python bench/server.py                          # preset:base, then preset:tiny, ~9 minutes
    .venv/bin/python bench/server.py --models preset:tiny     # one model, ~4 minutes
    .venv/bin/python bench/server.py --quick                  # shorter rounds
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import Verdict, command_line, machine, verdict_lines, write_results  # noqa: E402
from ernie_vl.app.hub import load_model  # noqa: E402
from ernie_vl.train.distributed import free_port  # noqa: E402
from ernie_vl.app.serve.text_trim import pad_id_of, trim_padding, trimming_is_exact  # noqa: E402
from retrieval.embed import encode_text_batch  # noqa: E402
from retrieval.index import Index  # noqa: E402

WORDS = "dog cat beach city night snow red blue car tree river person bike food mountain".split()


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection: ``await request(method, path, body) -> (status, body)``.

    Far cheaper per request than a general client, so the load generator does not compete with
    the servers for the machine's two cores. Handles ``content-length`` responses only (uvicorn's).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            await self.connect()
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", raw)
        if match is None:
            raise RuntimeError(f"response without content-length: {raw[:200]!r}")
        return status, await self.reader.readexactly(int(match.group(1)))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.writer = None


def run_async(coro):
    """Run on uvloop when installed (a cheaper event loop for the load generator)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def start_server(spec: str, index_dir: Path, max_batch: int, wait_ms: float, threads: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ernie_vl", "serve", spec, "--index", str(index_dir), "--port", str(port),
           "--max-batch-size", str(max_batch), "--max-wait-ms", str(wait_ms), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, port


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = 600) -> None:
    async def health() -> int:
        client = KeepAliveClient("127.0.0.1", port)
        try:
            return (await client.request("GET", "/health"))[0]
        finally:
            await client.close()

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if run_async(health()) == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server on port {port} did not start in {timeout_s} s")


async def search_stats(port: int) -> dict:
    client = KeepAliveClient("127.0.0.1", port)
    try:
        status, body = await client.request("GET", "/health")
    finally:
        await client.close()
    return json.loads(body)["stats"]["search_text"]


async def load(port: int, clients: int, duration_s: float, seed: int) -> dict:
    """Keep ``clients`` requests in flight for ``duration_s``, then let the last ones finish.

    Throughput counts the requests completed within the window; latencies include the last ones.
    """
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    in_window = 0
    errors = 0
    stop_at = 0.0  # set when the round starts

    async def worker(wid: int) -> None:
        nonlocal errors, in_window
        client = KeepAliveClient("127.0.0.1", port)
        n = 0
        try:
            while time.perf_counter() < stop_at:
                text = f"a {WORDS[rng.integers(len(WORDS))]} and a {WORDS[rng.integers(len(WORDS))]} {wid}-{n}"
                body = json.dumps({"text": text, "k": 10}).encode()
                t = time.perf_counter()
                try:
                    status, reply = await client.request("POST", "/search", body)
                    ok = status == 200 and reply.startswith(b'{"query"')
                except (OSError, asyncio.IncompleteReadError, RuntimeError):
                    ok = False
                    await client.close()
                if ok:
                    done = time.perf_counter()
                    latencies.append(done - t)
                    in_window += done <= stop_at
                else:
                    errors += 1
                n += 1
        finally:
            await client.close()

    before = await search_stats(port)
    start = time.perf_counter()
    stop_at = start + duration_s
    await asyncio.gather(*(worker(w) for w in range(clients)))
    elapsed = time.perf_counter() - start
    after = await search_stats(port)
    batches = after["batches"] - before["batches"]
    return {"requests": len(latencies), "in_window": in_window, "rate": in_window / duration_s,
            "errors": errors, "elapsed": elapsed, "latencies": latencies,
            "mean_batch": (after["items"] - before["items"]) / batches if batches else 0.0,
            "busy": (after["busy_s"] - before["busy_s"]) / elapsed,  # share of the time the worker computed
            "batch_ms": 1000 * (after["busy_s"] - before["busy_s"]) / batches if batches else 0.0}


def model_headroom(loaded, rounds: int = 3) -> dict[int, float]:
    """ms per query of the text forward alone (tokenise + trim + encode) at batch 1 and 32."""
    texts = [f"a {WORDS[i % 15]} and a {WORDS[(7 * i) % 15]} {i}" for i in range(32)]
    trim = trimming_is_exact(lambda t: encode_text_batch(loaded.model, t), loaded.tokenizer)
    prepare = (lambda t: trim_padding(t, pad_id_of(loaded.tokenizer))) if trim else (lambda t: t)
    out = {}
    for b in (1, 32):
        fn = lambda: encode_text_batch(loaded.model, prepare(loaded.tokenizer(texts[:b])))  # noqa: E731
        fn()
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[b] = 1000 * float(np.median(times)) / b
    return out


GOAL_CLIENTS, GOAL_RATIO = 32, 3.0  # BRIEF.md #12 (max_batch_size 32): >= 3x the throughput at 32 clients


def prepare_checkpoint(spec: str, tmp: Path) -> str:
    """A ``preset:NAME`` spec becomes a random-init checkpoint under ``tmp`` (seed 0); others pass through."""
    if not spec.startswith("preset:"):
        return spec
    import ernie_vl

    torch.manual_seed(0)
    path = tmp / spec[len("preset:"):] / "ckpt"
    ernie_vl.create_model(spec[len("preset:"):]).save_pretrained(str(path))
    return str(path)


def measure(model: str, args: argparse.Namespace, clients: list[int]) -> dict:
    """Both servers of one model, loaded in alternating rounds; returns the raw rounds and the head-room."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare_checkpoint(model, Path(tmp))
        loaded = load_model(spec)
        headroom = model_headroom(loaded)
        print(f"{model}: model alone {headroom[1]:.1f} ms/query at batch 1, {headroom[32]:.1f} at batch 32",
              flush=True)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((10_000, loaded.embedding_dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index_dir = Index.build(x, kind="flat", model_id=loaded.model_id,
                                metadata=[{"path": f"img{i}.jpg"} for i in range(len(x))]).save(Path(tmp) / "idx")
        del loaded
        servers = {"on": start_server(spec, index_dir, 32, args.max_wait_ms, args.threads),
                   "off": start_server(spec, index_dir, 1, args.max_wait_ms, args.threads)}
        try:
            for proc, port in servers.values():
                wait_ready(proc, port)
            for _, port in servers.values():  # warm-up
                run_async(load(port, 2, 2.0, 0))
            results = {(c, m): [] for c in clients for m in servers}
            for c in clients:
                for r in range(args.rounds):
                    for mode in (["on", "off"] if r % 2 == 0 else ["off", "on"]):
                        res = run_async(load(servers[mode][1], c, args.seconds, seed=r))
                        results[(c, mode)].append(res)
                        print(f"{model} clients={c:2d} batching={mode:3s} round {r}: {res['rate']:.1f} req/s, "
                              f"mean batch {res['mean_batch']:.1f} ({res['batch_ms']:.0f} ms each, worker busy "
                              f"{100 * res['busy']:.0f}%), errors {res['errors']}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {"results": results, "headroom": headroom, "seconds": time.perf_counter() - t0}


def model_section(model: str, run: dict, clients: list[int]) -> tuple[str, dict[int, float]]:
    """Markdown section of one model and its on/off throughput ratio per client count."""
    results, headroom = run["results"], run["headroom"]
    rows, summary, ratios = [], [], {}
    for c in clients:
        stats = {}
        for mode in ("on", "off"):
            runs = results[(c, mode)]
            lat = np.concatenate([np.array(r["latencies"]) for r in runs]) * 1000
            rps = float(np.median([r["rate"] for r in runs]))
            stats[mode] = (rps, lat.mean(), np.percentile(lat, 99))
            rows.append(f"| {c} | {mode} | {rps:.1f} | {lat.mean():.0f} | {np.percentile(lat, 50):.0f} | "
                        f"{np.percentile(lat, 99):.0f} | {np.mean([r['mean_batch'] for r in runs]):.1f} | "
                        f"{np.mean([r['batch_ms'] for r in runs]):.0f} | {100 * np.mean([r['busy'] for r in runs]):.0f}% | "
                        f"{sum(r['requests'] for r in runs)} | {sum(r['errors'] for r in runs)} |")
        on, off = stats["on"], stats["off"]
        ratios[c] = on[0] / off[0] if off[0] > 0 else float("nan")
        summary.append(f"| {c} | **{ratios[c]:.2f}x** | {100 * (1 - on[1] / off[1]):+.0f}% | "
                       f"{100 * (1 - on[2] / off[2]):+.0f}% |")
    text = "\n".join([
        f"## `{model}`", "",
        f"Model alone (tokenise + trimmed text forward, measured before the servers start): {headroom[1]:.1f} "
        f"ms/query at batch 1, {headroom[32]:.1f} ms/query at batch 32 ({headroom[1] / headroom[32]:.1f}x). "
        f"This model's part of the run took {run['seconds']:.0f} s.", "",
        "| clients | batching | req/s | mean ms | p50 ms | p99 ms | mean batch | ms per batch | worker busy | requests | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows, "",
        "| clients | throughput on/off | mean latency saved | p99 latency saved |",
        "|---:|---:|---:|---:|",
        *summary,
    ])
    return text, ratios


def verdict_of(model: str, ratios: dict[int, float]) -> Verdict:
    """The goal row of one model: throughput on/off at GOAL_CLIENTS clients."""
    what = f"Server `{model}`: throughput with dynamic batching on / off, {GOAL_CLIENTS} clients"
    ratio = ratios.get(GOAL_CLIENTS)
    if ratio is None or ratio != ratio:
        return Verdict(what, f">= {GOAL_RATIO:g}x", "not measured", None, claim="12")
    return Verdict(what, f">= {GOAL_RATIO:g}x", f"{ratio:.2f}x", ratio >= GOAL_RATIO, claim="12")


def report(models: list[str], sections: list[str], verdicts: list[Verdict], args: argparse.Namespace,
           facts, total_s: float) -> str:
    """The whole results file: method, machine, one section per model, the computed verdicts."""
    lines = [
        "# Server: dynamic batching on vs off", "",
        f"Command: `{command_line('server.py')}`", "",
        f"`ernie-vl serve` of each model (random init, seed 0) with a 10k-item flat index, `POST /search` with a "
        f"short text (tokenise, text forward, top-10 search). Batching on: max_batch_size 32, max_wait_ms "
        f"{args.max_wait_ms:g}; off: max_batch_size 1 (one forward per request, in arrival order, same code "
        f"otherwise). Both servers run at once on loopback (uvloop + httptools when installed), {args.threads} "
        f"torch threads each, and are loaded in alternating rounds of {args.seconds:g} s ({args.rounds} per "
        f"setting); throughput counts the requests completed within a round's window (median round); latencies "
        f"pool all rounds, including requests that finish after the window. The load generator (raw asyncio "
        f"HTTP/1.1 keep-alive connections) shares the machine's {facts.cores} CPUs with both servers. `worker "
        f"busy` is the share of the wall time the server's model worker computed; `preset:base` is model-bound, "
        f"`preset:tiny` weighs the HTTP path and the load generator as much as the model.", "",
        facts.line() + f" Total {total_s:.0f} s.", "",
        f"Goal (BRIEF.md #12, max_batch_size 32): at {GOAL_CLIENTS} clients, >= {GOAL_RATIO:g}x the throughput "
        f"with batching on than off, for every model measured.", "",
    ]
    for section in sections:
        lines += [section, ""]
    lines += ["Verdicts (computed by the script):", ""]
    lines += verdict_lines(verdicts)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["preset:base", "preset:tiny"],
                    help="preset:NAME (an ErnieVL preset, random init, saved to a temporary checkpoint) or a "
                         "model spec such as open_clip:ViT-B-32 (default: preset:base preset:tiny)")
    ap.add_argument("--quick", action="store_true", help="6 s rounds, 1 round per setting")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of one round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--results", default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 6.0, 1
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    sections, verdicts = [], []
    for model in args.models:
        text, ratios = model_section(model, measure(model, args, clients), clients)
        sections.append(text)
        verdicts.append(verdict_of(model, ratios))
        print(text, flush=True)
    facts = machine(load_before)
    text = report(args.models, sections, verdicts, args, facts, time.perf_counter() - t0)
    write_results("server", text, verdicts, facts, command_line("server.py"),
                  Path(args.results) if args.results else None)
    print(text)


if __name__ == "__main__":
    main()
