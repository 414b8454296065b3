"""Server abuse benchmark: replays each attack of the "safe under abuse" issue against a real
``ernie-vl serve`` process on 127.0.0.1 and checks status codes, the server's peak RSS, what it read
and wrote, and that ``/health`` stays up. Every loop is bounded; the run stops by itself.

Cases (probes from ``ernie_vl.app.serve.probes``):
 1. 40 parallel decompression-bomb PNG uploads (6000x6000, ~35 KB each): 413 from the header;
    then 40 parallel 4000x4000 uploads, just under a 4096² cap, that are decoded: peak RSS delta
    < 1 GB, memory handed back afterwards;
 2. a 300 MB JSON body (declared and streamed) and a chunked 400 MB multipart upload: 413, and the
    server reads and writes nothing like the body (``/proc/PID/io`` rchar / wchar);
 3. many half-open connections (request head never finished; 21,000 by default, from several
    processes so that no client process needs more file handles than the limit): all closed by the
    server, ``/health`` answers throughout;
 4. each malformed JSON case on one keep-alive connection: 4xx with a short message, no exception
    text, and the next request on the same connection works;
 5. what held before: 64 keep-alive clients for 20 s, 0 errors.

``--anchor REV`` also runs the probes, at smaller counts and without verdicts, against the server of
git revision REV (the code before this hardening), to show that each probe catches what the issue
reported.

    .venv/bin/python bench/server_abuse.py            # ~5 minutes
    .venv/bin/python bench/server_abuse.py --quick    # smaller counts, ~1 minute
    .venv/bin/python bench/server_abuse.py --anchor 25998a7   # and the server before the hardening
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import Verdict, command_line, machine, write_results  # noqa: E402
from ernie_vl.app.serve.probes import (RawConnection, bomb_png, check_malformed_json, declared_too_large,  # noqa: E402
                                       half_open_flood, health_ok, parallel_uploads, streamed_upload)
from ernie_vl.app.serve.runner import free_port  # noqa: E402

MB = 1024 * 1024
CAP_PIXELS = 4096 * 4096


def proc_io(pid: int) -> dict[str, int]:
    """rchar / wchar of ``pid``: bytes it read and wrote through syscalls (sockets and files)."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def start_server(ckpt: Path, index: Path, tmp: Path, code: Path = ROOT,
                 extra: tuple = ("--max-image-pixels", str(CAP_PIXELS))) -> tuple[subprocess.Popen, str]:
    """``ernie-vl serve`` of the code in ``code`` on a free loopback port, temporary files in ``tmp``."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmp), PYTHONPATH=str(code))
    cmd = [sys.executable, "-m", "ernie_vl", "serve", str(ckpt), "--index", str(index), "--port", str(port),
           *extra, "--log-level", "error"]
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server of {code} exited with {proc.returncode}")
        if health_ok(url, timeout_s=5):
            return proc, url
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def bombs(url: str, pid: int, side: int, n: int) -> dict:
    png = bomb_png(side, side)
    reset_peak_rss(pid)
    r = parallel_uploads(url, png, n, pid, settle_s=3.0)
    peak = max(r.rss_peak, peak_rss(pid))
    return {"side": side, "png_bytes": len(png), "uploads": n, "statuses": r.statuses, "errors": r.errors,
            "rss_before_mb": r.rss_before / MB, "peak_delta_mb": (peak - r.rss_before) / MB,
            "held_after_mb": r.held_after / MB, "health_during": r.health_during}


def body_case(url: str, pid: int, name: str, **kwargs) -> dict:
    before = proc_io(pid)
    r = streamed_upload(url, **kwargs)
    time.sleep(0.5)
    after = proc_io(pid)
    return {"case": name, "status": r.status, "body_mb": r.total / MB, "client_sent_mb": r.bytes_sent / MB,
            "server_read_mb": (after["rchar"] - before["rchar"]) / MB,
            "server_wrote_mb": (after["wchar"] - before["wchar"]) / MB, "seconds": r.seconds}


def _flood(args: tuple[str, int, float]) -> dict:
    url, count, wait_s = args
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asdict(half_open_flood(url, count, wait_s))


def flood(url: str, total: int, procs: int, wait_s: float) -> dict:
    stop = threading.Event()
    checks = {"ok": 0, "failed": 0}

    def watch():
        while not stop.is_set():
            checks["ok" if health_ok(url, timeout_s=10) else "failed"] += 1
            stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_flood, [(url, total // procs + (i < total % procs), wait_s) for i in range(procs)])
    stop.set()
    watcher.join()
    closed_in = [p["seconds_until_all_closed"] for p in parts]
    return {"connections": total, "processes": procs, "opened": sum(p["opened"] for p in parts),
            "failed_to_open": sum(p["failed_to_open"] for p in parts),
            "closed_by_server": sum(p["closed_by_server"] for p in parts),
            "all_closed_after_s": None if None in closed_in else max(closed_in),
            "health_checks_ok": checks["ok"], "health_checks_failed": checks["failed"],
            "health_in_each_process": all(p["health_during"] and p["health_after"] for p in parts),
            "seconds": time.monotonic() - start}


def steady_clients(url: str, clients: int, seconds: float) -> dict:
    body = json.dumps({"text": "a red circle", "k": 5}).encode()
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client():
        ok = errors = 0
        conn = None
        while time.monotonic() < deadline:
            try:
                conn = conn or RawConnection(url, timeout_s=60)
                if conn.request("POST", "/search", body).status == 200:
                    ok += 1
                else:
                    errors += 1
            except OSError:
                errors += 1
                conn = None
        with lock:
            counts["ok"] += ok
            counts["errors"] += errors

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "seconds": seconds, **counts}


BUILD = """
import sys
import numpy as np
import ernie_vl
from retrieval.index import Index
out = sys.argv[1]
ernie_vl.create_model("tiny").save_pretrained(out + "/ckpt")
model = ernie_vl.ErnieVL.from_pretrained(out + "/ckpt").eval()
dim = int(model.encode_text(model.tokenizer(["a"])).shape[-1])
x = np.random.default_rng(0).standard_normal((1000, dim)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
Index.build(x, kind="flat", metadata=[{"path": f"{i}.jpg"} for i in range(len(x))],
            model_id=model.model_id).save(out + "/index")
"""


def build_model(tmp: Path, code: Path = ROOT) -> tuple[Path, Path]:
    """A random-init ``tiny`` checkpoint and a 1000-item flat index, written by the code in ``code``."""
    env = dict(os.environ, PYTHONPATH=str(code))
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", BUILD, str(tmp)], cwd=code, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return tmp / "ckpt", tmp / "index"


def export_revision(rev: str, dest: Path) -> Path:
    """The project's files at git revision ``rev``, unpacked into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _guarded(fn, *args, **kwargs) -> dict:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # the anchor may fail a probe outright: record it, go on
        return {"failed": f"{type(err).__name__}: {err}"[:200]}


def anchor_cases(rev: str, tmp: Path) -> dict:
    """The same probes, at smaller counts, against the server of revision ``rev`` (no verdicts)."""
    code = export_revision(rev, tmp / "anchor-code")
    ckpt, index = build_model(tmp / "anchor-model", code)
    proc, url = start_server(ckpt, index, tmp / "spool", code=code, extra=[])
    try:
        res = {"rev": rev, "bombs": _guarded(bombs, url, proc.pid, 6000, 8)}
        print("anchor bombs:", res["bombs"], flush=True)
        res["bodies"] = [_guarded(body_case, url, proc.pid, "64 MB JSON, content-length", path="/search",
                                  total=64 * MB, chunked=False),
                         _guarded(body_case, url, proc.pid, "64 MB multipart, chunked", path="/embed/image",
                                  total=64 * MB, content_type="multipart/form-data")]
        print("anchor bodies:", res["bodies"], flush=True)
        res["half_open"] = _guarded(lambda: asdict(half_open_flood(url, 1000, wait_s=20)))
        print("anchor half-open:", res["half_open"], flush=True)
        res["malformed"] = _guarded(check_malformed_json, url)
        res["alive"] = proc.poll() is None
    finally:
        stop_server(proc)
    return res


def anchor_report(a: dict) -> list[str]:
    lines = ["", f"## The same probes against the server before this work (revision `{a['rev']}`)", "",
             "Smaller counts, so that the old server's memory stays within the shared machine; no verdicts, "
             "these rows show that each probe catches the behaviour the issue reported.", ""]
    b = a["bombs"]
    if "failed" in b:
        lines.append(f"- 8 parallel 6000² PNG bombs: probe failed ({b['failed']})")
    else:
        lines.append(f"- 8 parallel 6000² PNG bombs: answers {b['statuses']} ({b['errors']} connection errors), "
                     f"peak RSS delta {b['peak_delta_mb']:.0f} MB, {b['held_after_mb']:.0f} MB held 3 s after")
    for c in a["bodies"]:
        if "failed" in c:
            lines.append(f"- body probe failed ({c['failed']})")
        else:
            lines.append(f"- {c['case']}: status {c['status']}, server read {c['server_read_mb']:.1f} MB, "
                         f"wrote {c['server_wrote_mb']:.1f} MB")
    h = a["half_open"]
    if "failed" in h:
        lines.append(f"- 1000 half-open connections: probe failed ({h['failed']})")
    else:
        lines.append(f"- 1000 half-open connections: {h['closed_by_server']} of {h['opened']} closed by the server "
                     f"within 20 s; /health during: {'up' if h['health_during'] else 'DOWN'}")
    m = a["malformed"]
    if isinstance(m, dict):
        lines.append(f"- malformed JSON: probe failed ({m['failed']})")
    else:
        bad = [r for r in m if not (r["status"] and 400 <= r["status"] < 500 and r["next_ok"] and not r["leaks"])]
        lines.append(f"- malformed JSON: {len(m) - len(bad)} of {len(m)} cases answered 4xx on a connection that "
                     f"stayed usable; the others: " + "; ".join(
                         f"{r['case']} -> {r['status'] or 'no answer, ' + r['error']}"
                         f"{' (exception text shown)' if r['leaks'] else ''}"
                         f"{'' if r['next_ok'] else ', next request failed'}" for r in bad))
    lines.append(f"- server process alive at the end: {a['alive']}")
    return lines


def report(res: dict, verdicts: list[Verdict], mach, cmd: str) -> str:
    b1, b2 = res["bombs_refused"], res["bombs_decoded"]
    lines = [
        "# Server under abuse",
        "",
        f"Command: `{cmd}`",
        "",
        "One `ernie-vl serve` process (the `tiny` preset, random init, a 1000-item flat index, default limits "
        f"except `--max-image-pixels {CAP_PIXELS}` = 4096², the largest automatic cap) on 127.0.0.1; "
        "the attacks come from this script's threads and processes on the same machine.",
        "",
        mach.line() + (" **The machine was shared with other jobs while this ran.**" if mach.load_before > 1.5 else ""),
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {v.what}: {v.goal} | {v.measured} | {'met' if v.met else '**missed**'} |" for v in verdicts]
    lines += ["", "## Decompression bombs (40 parallel uploads)", "",
              "| image | PNG bytes | answers | peak RSS delta | RSS held 3 s after | /health during |",
              "|---|---:|---|---:|---:|---|"]
    for b in (b1, b2):
        lines.append(f"| {b['side']}x{b['side']} RGB | {b['png_bytes']} | {b['statuses']} "
                     f"({b['errors']} connection errors) | {b['peak_delta_mb']:.0f} MB | {b['held_after_mb']:.0f} MB | "
                     f"{'up' if b['health_during'] else 'DOWN'} |")
    lines += ["", "## Bodies over the limit", "",
              "| case | status | body | client got out before the answer | server read | server wrote |",
              "|---|---:|---:|---:|---:|---:|"]
    for c in res["bodies"]:
        lines.append(f"| {c['case']} | {c['status']} | {c['body_mb']:.0f} MB | {c['client_sent_mb']:.1f} MB | "
                     f"{c['server_read_mb']:.1f} MB | {c['server_wrote_mb']:.2f} MB |")
    f = res["half_open"]
    lines += ["", "## Half-open connections", "",
              f"{f['connections']} connections from {f['processes']} processes send `GET /health HTTP/1.1\\r\\nhost: x\\r\\n` "
              f"and never finish the head. Opened {f['opened']} ({f['failed_to_open']} refused or timed out at connect), "
              f"closed by the server: {f['closed_by_server']}, all closed {f['all_closed_after_s'] and round(f['all_closed_after_s'], 1)} s "
              f"after the flood began; /health from a watcher once a second: {f['health_checks_ok']} answered, "
              f"{f['health_checks_failed']} failed.", "",
              "## Malformed JSON (one keep-alive connection, GET /health after each)", "",
              "| case | path | status | message | next request |", "|---|---|---:|---|---|"]
    for r in res["malformed"]:
        msg = r["error"].replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['path']} | {r['status']} | {msg} | {'200' if r['next_ok'] else 'FAILED'} |")
    s = res["steady"]
    lines += ["", f"## Steady load\n\n{s['clients']} keep-alive clients, {s['seconds']:.0f} s of `POST /search`: "
              f"{s['ok']} answered 200, {s['errors']} errors.", "",
              f"Server connection counters at the end: `{json.dumps(res['connections'])}`; refusals: "
              f"`{json.dumps(res['refused'])}`; decoder: `{json.dumps(res['decode'])}`. Total {res['seconds']:.0f} s."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (2,000 half-open connections, 5 s steady load)")
    ap.add_argument("--half-open", type=int, default=None, help="half-open connections (default 21000, quick 2000)")
    ap.add_argument("--anchor", default=None, metavar="REV",
                    help="also run the probes (smaller counts) against the server of git revision REV")
    ap.add_argument("--no-write", action="store_true", help="print, do not write bench/results")
    args = ap.parse_args()
    half_open = args.half_open or (2000 if args.quick else 21000)
    mach_before = os.getloadavg()[0]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "spool").mkdir()
        ckpt, index = build_model(tmp / "model")
        proc, url = start_server(ckpt, index, tmp / "spool")
        try:
            res = {"bombs_refused": bombs(url, proc.pid, 6000, 40)}
            print("bombs 6000²:", res["bombs_refused"], flush=True)
            res["bombs_decoded"] = bombs(url, proc.pid, 4000, 40)
            print("bombs 4000²:", res["bombs_decoded"], flush=True)
            res["bodies"] = [
                body_case(url, proc.pid, "300 MB JSON, content-length", path="/search", total=300 * MB, chunked=False),
                body_case(url, proc.pid, "300 MB JSON, chunked", path="/search", total=300 * MB),
                body_case(url, proc.pid, "400 MB multipart, chunked", path="/embed/image", total=400 * MB,
                          content_type="multipart/form-data"),
            ]
            declared = declared_too_large(url, "/search", 300 * MB)
            res["bodies"].append({"case": "300 MB declared, no body sent", "status": declared.status, "body_mb": 300.0,
                                  "client_sent_mb": 0.0, "server_read_mb": 0.0, "server_wrote_mb": 0.0})
            print("bodies:", res["bodies"], flush=True)
            res["half_open"] = flood(url, half_open, procs=3, wait_s=120)
            print("half-open:", res["half_open"], flush=True)
            res["malformed"] = check_malformed_json(url)
            res["steady"] = steady_clients(url, 64, 5.0 if args.quick else 20.0)
            print("steady:", res["steady"], flush=True)
            health = json.loads(RawConnection(url).request("GET", "/health").body)
            res.update(connections=health["connections"], refused=health["refused"], decode=health["decode"],
                       alive=proc.poll() is None)
        finally:
            stop_server(proc)
        anchor = anchor_cases(args.anchor, tmp) if args.anchor else None
    res["seconds"] = time.monotonic() - start
    verdicts = make_verdicts(res)
    mach = machine(load_before=mach_before)
    cmd = command_line("server_abuse.py")
    text = report(res, verdicts, mach, cmd)
    if anchor is not None:
        text += "\n" + "\n".join(anchor_report(anchor)) + "\n"
    print(text)
    if not args.no_write:
        print("wrote", write_results("server_abuse", text, verdicts, mach, cmd))
    return 0 if all(v.met for v in verdicts) else 1


def make_verdicts(res: dict) -> list[Verdict]:
    b1, b2, f, s = res["bombs_refused"], res["bombs_decoded"], res["half_open"], res["steady"]
    bodies = {c["case"]: c for c in res["bodies"]}
    chunked_form = bodies["400 MB multipart, chunked"]
    bad = [r for r in res["malformed"] if not (r["status"] and 400 <= r["status"] < 500 and r["next_ok"] and not r["leaks"])]
    return [
        Verdict("40 parallel 6000² PNG bombs", "all 413, peak RSS delta < 1 GB, /health up",
                f"{b1['statuses']}, {b1['peak_delta_mb']:.0f} MB",
                b1["statuses"] == {413: 40} and b1["peak_delta_mb"] < 1024 and b1["health_during"]),
        Verdict("40 parallel 4000² PNGs (decoded)", "all 200, peak RSS delta < 1 GB, < 256 MB held after",
                f"{b2['statuses']}, peak {b2['peak_delta_mb']:.0f} MB, held {b2['held_after_mb']:.0f} MB",
                b2["statuses"] == {200: 40} and b2["peak_delta_mb"] < 1024 and b2["held_after_mb"] < 256),
        Verdict("300 MB JSON bodies", "413, server reads < 64 MB of it",
                ", ".join(f"{c['status']} / read {c['server_read_mb']:.0f} MB" for n, c in bodies.items() if "JSON" in n),
                all(c["status"] == 413 and c["server_read_mb"] < 64 for n, c in bodies.items() if "JSON" in n)),
        Verdict("chunked 400 MB upload", "413, server writes <= the 32 MB form limit",
                f"{chunked_form['status']}, wrote {chunked_form['server_wrote_mb']:.1f} MB",
                chunked_form["status"] == 413 and chunked_form["server_wrote_mb"] <= 32),
        Verdict(f"{f['connections']} half-open connections", "all closed by the server, /health always up",
                f"{f['closed_by_server']}/{f['opened']} closed, /health {f['health_checks_ok']} ok "
                f"/ {f['health_checks_failed']} failed",
                f["closed_by_server"] == f["opened"] and f["health_checks_failed"] == 0 and f["health_in_each_process"]),
        Verdict(f"{len(res['malformed'])} malformed JSON cases", "4xx, no exception text, connection kept",
                f"{len(res['malformed']) - len(bad)} of {len(res['malformed'])}", not bad),
        Verdict("64 clients, steady", "0 errors", f"{s['ok']} ok, {s['errors']} errors", s["errors"] == 0 and s["ok"] > 0),
    ]


if __name__ == "__main__":
    sys.exit(main())
