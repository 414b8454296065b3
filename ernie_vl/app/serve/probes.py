"""Abuse probes: raw-socket HTTP/1.1 clients that send what well-behaved clients never send.

Each probe replays one attack on a running server and returns what it saw as a plain dict; the
tests run them small, ``bench/server_abuse.py`` at full scale. Everything is bounded (counts,
bytes, deadlines): a probe always stops by itself. Loopback only.
"""
from __future__ import annotations

import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise ValueError(f"probes only run against loopback servers, got {url!r}")
    return parts.hostname, parts.port or 80


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json_error(self) -> str:
        text = self.body.decode("utf-8", "replace")
        match = re.search(r'"error"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
        return match.group(1) if match else text[:200]


class RawConnection:
    """One keep-alive HTTP/1.1 connection over a plain socket (content-length responses only)."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection(_address(url), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json",
                extra: str = "") -> Response:
        head = (f"{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\n{extra}\r\n").encode("latin-1")
        self.send(head + body)
        return self.read_response()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self._buf += chunk
        return bool(chunk)

    def read_response(self) -> Response:
        while b"\r\n\r\n" not in self._buf:
            if not self._fill():
                raise ConnectionError("the server closed the connection before answering")
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self._buf) < length:
            if not self._fill():
                raise ConnectionError("the server closed the connection in the middle of a response")
        body, self._buf = self._buf[:length], self._buf[length:]
        return Response(status, headers, body)

    def is_closed_by_server(self, wait_s: float) -> bool:
        """True when the server closes this connection within ``wait_s`` (reads until EOF or timeout)."""
        self.sock.settimeout(wait_s)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:                   # reset counts as closed
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def health_ok(url: str, timeout_s: float = 30.0) -> bool:
    """GET /health on a fresh connection answers 200."""
    try:
        conn = RawConnection(url, timeout_s)
        try:
            return conn.request("GET", "/health").status == 200
        finally:
            conn.close()
    except OSError:
        return False


# --- malformed JSON ---------------------------------------------------------------------------

def malformed_json_cases(depth: int = 100_000) -> dict[str, tuple[str, bytes]]:
    """name -> (path, body): the bodies that gave 500s and reset connections before."""
    return {
        "k Infinity": ("/search", b'{"text": "a", "k": Infinity}'),
        "k NaN": ("/search", b'{"text": "a", "k": NaN}'),
        "k -Infinity": ("/search", b'{"text": "a", "k": -Infinity}'),
        "k 1e400 (float overflow)": ("/search", b'{"text": "a", "k": 1e400}'),
        "k with 5000 digits": ("/search", b'{"text": "a", "k": ' + b"9" * 5000 + b"}"),
        f"nesting {depth} deep": ("/search", b"[" * depth + b"]" * depth),
        "nesting inside a field": ("/embed/text", b'{"texts": ' + b"[" * depth + b"]" * depth + b"}"),
        "lone surrogate in text": ("/search", b'{"text": "\\ud800", "k": 1}'),
        "lone surrogate in texts": ("/embed/text", b'{"texts": ["ok", "a\\udfffb"]}'),
        "invalid UTF-8": ("/embed/text", b'{"text": "\xff\xfe"}'),
        "not JSON": ("/search", b"{not json"),
        "empty body": ("/search", b""),
        "top-level array": ("/search", b'["a"]'),
        "text is a number": ("/search", b'{"text": 5}'),
        "texts is an object": ("/embed/text", b'{"texts": {"a": 1}}'),
        "k is a list": ("/search", b'{"text": "a", "k": [3]}'),
        "k is true": ("/search", b'{"text": "a", "k": true}'),
        "k is 2.5": ("/search", b'{"text": "a", "k": 2.5}'),
    }


LEAK_MARKERS = ("Traceback", "Error:", "Exception", 'File "', "line ")


def check_malformed_json(url: str, depth: int = 100_000) -> list[dict]:
    """Send every malformed case on ONE keep-alive connection, each followed by GET /health."""
    rows = []
    conn = RawConnection(url)
    try:
        for name, (path, body) in malformed_json_cases(depth).items():
            row = {"case": name, "path": path}
            try:
                r = conn.request("POST", path, body)
                row.update(status=r.status, error=r.json_error()[:120],
                           leaks=any(m in r.body.decode("utf-8", "replace") for m in LEAK_MARKERS))
                row["next_ok"] = conn.request("GET", "/health").status == 200
            except OSError as err:
                row.update(status=None, error=f"connection failed: {type(err).__name__}", leaks=False, next_ok=False)
                conn.close()
                conn = RawConnection(url)
            rows.append(row)
    finally:
        conn.close()
    return rows


# --- bodies over the limit --------------------------------------------------------------------

def declared_too_large(url: str, path: str, size: int, content_type: str = "application/json") -> Response:
    """Headers that declare a ``size``-byte body, no body sent: the answer must come at once."""
    conn = RawConnection(url)
    try:
        conn.send((f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: {content_type}\r\n"
                   f"content-length: {size}\r\n\r\n").encode())
        return conn.read_response()
    finally:
        conn.close()


@dataclass
class StreamResult:
    status: Optional[int]
    bytes_sent: int
    total: int
    seconds: float
    error: str = ""


def streamed_upload(url: str, path: str, total: int, chunk: int = 1 << 20, chunked: bool = True,
                    content_type: str = "application/json", deadline_s: float = 120.0) -> StreamResult:
    """Send a ``total``-byte body (chunked transfer encoding by default) while a reader waits for the
    answer; stop sending as soon as it arrives or the server closes. ``bytes_sent`` is how much
    got out before that (the server read at most this, plus what sat in socket buffers)."""
    conn = RawConnection(url, timeout_s=deadline_s)
    result: dict = {}

    def read():
        try:
            result["response"] = conn.read_response()
        except OSError as err:
            result["error"] = type(err).__name__

    framing = "transfer-encoding: chunked" if chunked else f"content-length: {total}"
    if content_type.startswith("multipart/form-data"):
        content_type += "; boundary=xyz"
    conn.send((f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: {content_type}\r\n"
               f"{framing}\r\n\r\n").encode())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    payload = (b"--xyz\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
               if content_type.startswith("multipart") else b'{"text": "')
    start, sent = time.monotonic(), 0
    piece = b"a" * chunk
    try:
        while sent < total and reader.is_alive() and time.monotonic() - start < deadline_s:
            data = (payload + piece[len(payload):]) if sent == 0 else piece
            data = data[: total - sent]
            conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
        if chunked and sent >= total and reader.is_alive():
            conn.send(b"0\r\n\r\n")
    except OSError as err:
        result.setdefault("error", type(err).__name__)
    reader.join(timeout=max(1.0, deadline_s - (time.monotonic() - start)))
    conn.close()
    response = result.get("response")
    return StreamResult(response.status if response else None, sent, total, time.monotonic() - start,
                        result.get("error", ""))


# --- half-open connections --------------------------------------------------------------------

@dataclass
class HalfOpenResult:
    opened: int
    failed_to_open: int
    health_during: bool
    closed_by_server: int
    seconds_until_all_closed: Optional[float]
    health_after: bool


def half_open_flood(url: str, count: int, wait_s: float = 60.0, partial: bytes = b"GET /health HTTP/1.1\r\nhost: x\r\n"
                    ) -> HalfOpenResult:
    """Open ``count`` connections that send an unfinished request head, check /health meanwhile, then
    wait (at most ``wait_s``) until the server has closed all of them."""
    socks: list[socket.socket] = []
    failed = 0
    address = _address(url)
    start = time.monotonic()
    for _ in range(count):
        try:
            s = socket.create_connection(address, timeout=10)
            s.sendall(partial)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            failed += 1
    health_during = health_ok(url)
    closed = 0
    pending = list(socks)
    deadline = start + wait_s
    while pending and time.monotonic() < deadline:
        still = []
        for s in pending:
            try:
                data = s.recv(4096)
                if data == b"" or not data.startswith(b"HTTP/"):
                    closed += 1
                    s.close()
                else:                       # an error answer (e.g. 503) then a close: wait for the close
                    still.append(s)
            except BlockingIOError:
                still.append(s)
            except OSError:
                closed += 1
                s.close()
        pending = still
        if pending:
            time.sleep(0.05)
    all_closed = time.monotonic() - start if not pending else None
    for s in pending:
        s.close()
    return HalfOpenResult(len(socks), failed, health_during, closed, all_closed, health_ok(url))


# --- decompression bombs ----------------------------------------------------------------------

def bomb_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A tiny PNG (tens of KB) that decodes to ``width`` x ``height`` pixels of ``mode``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), 255 if mode in ("1", "L") else (255, 255, 255)).save(
        buf, format="PNG", compress_level=9)
    return buf.getvalue()


def multipart_image(png: bytes, name: str = "bomb.png", field: str = "file") -> tuple[bytes, str]:
    boundary = "ernievlbomb"
    body = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"content-type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class BombResult:
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    health_during: bool = True

    @property
    def peak_delta(self) -> int:
        return self.rss_peak - self.rss_before

    @property
    def held_after(self) -> int:
        return self.rss_after - self.rss_before


def parallel_uploads(url: str, png: bytes, n: int, pid: int, settle_s: float = 2.0,
                     sample_every_s: float = 0.01, rss: Callable[[int], int] = rss_bytes) -> BombResult:
    """``n`` uploads of ``png`` to /embed/image at once (one thread each); RSS of ``pid`` sampled
    throughout, /health checked while they run, RSS read again ``settle_s`` after the last answer."""
    body, ctype = multipart_image(png)
    result = BombResult(rss_before=rss(pid))
    result.rss_peak = result.rss_before
    done = threading.Event()

    def sample():
        while not done.is_set():
            result.rss_peak = max(result.rss_peak, rss(pid))
            time.sleep(sample_every_s)

    def upload(_):
        conn = RawConnection(url, timeout_s=300)
        try:
            return conn.request("POST", "/embed/image", body, content_type=ctype).status
        except OSError:
            return None
        finally:
            conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(upload, i) for i in range(n)]
        result.health_during = health_ok(url)
        for f in futures:
            status = f.result()
            if status is None:
                result.errors += 1
            else:
                result.statuses[status] = result.statuses.get(status, 0) + 1
    time.sleep(settle_s)
    done.set()
    sampler.join()
    result.rss_after = rss(pid)
    return result
