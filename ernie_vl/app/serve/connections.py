"""Connection limits under uvicorn: a header deadline, a cap on header bytes, and a connection cap
that sheds idle connections first.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but not a connection that
opened and never finished its request headers: thousands of those hold every file handle. The
protocol classes made by :func:`guarded_protocol` (subclasses of uvicorn's httptools or h11
protocol) add:

- **a header deadline**: a connection gets ``header_timeout_s`` from its first byte of a request
  (or from opening) to finish the request line and headers, else it is closed;
- **a header size cap**: more than ``max_header_bytes`` before the headers end gets 431 and a close
  (h11 has ``h11_max_incomplete_event_size``; httptools has no limit of its own);
- **a connection cap**: at most ``max_connections`` open at once. A new connection over the cap
  closes the connection that has waited longest without a request in progress (half-open or
  idle); only when every connection is busy with a request is the new one answered 503. A flood
  of half-open connections therefore never locks out a client that sends its request.
"""
from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Optional

log = logging.getLogger("ernie_vl.app.serve")

_FD_RESERVE = 256          # file handles kept free for the model, index, uploads and logs


def raise_open_file_limit() -> int:
    """Lift this process's soft open-file limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections() -> int:
    """4096, or fewer when the open-file limit would not hold that many plus a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft - _FD_RESERVE))


@dataclass
class ConnectionLimits:
    """Socket-level limits (see the module docstring); ``max_connections`` None = automatic."""

    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_connections: Optional[int] = None
    limit_concurrency: Optional[int] = None   # uvicorn's: 503 once connections or tasks reach it
    backlog: int = 2048

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keep_alive_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        for name in ("max_header_bytes", "max_connections", "limit_concurrency", "backlog"):
            value = getattr(self, name)
            if value is None and name in ("max_connections", "limit_concurrency"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def resolved(self) -> "ConnectionLimits":
        """A copy with ``max_connections`` filled in from the open-file limit."""
        return ConnectionLimits(**{**asdict(self), "max_connections": self.max_connections or default_max_connections()})


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection."""
    body = ('{"error": "%s"}' % message).encode("ascii")
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii") + body


_HEADERS_TOO_LARGE = _raw_response(431, "Request Header Fields Too Large", "request headers too large")
_TOO_MANY = _raw_response(503, "Service Unavailable", "too many connections")


class ConnectionRegistry:
    """The open connections of one server; ``waiting`` holds those without a request in progress,
    oldest first (the ones to shed at the cap). Counts go to ``stats``."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set = set()
        self.waiting: "OrderedDict[int, Any]" = OrderedDict()
        self.stats = {"opened": 0, "shed": 0, "refused": 0, "header_timeouts": 0, "headers_too_large": 0}

    def admit(self, conn: Any) -> bool:
        """Register ``conn``; False when it must be refused (every other connection is busy)."""
        self.stats["opened"] += 1
        if len(self.open) >= self.limits.max_connections:
            if not self.waiting:
                self.stats["refused"] += 1
                return False
            _, oldest = self.waiting.popitem(last=False)
            self.stats["shed"] += 1
            self.forget(oldest)
            oldest.transport.close()
        self.open.add(conn)
        self.waiting[id(conn)] = conn
        return True

    def busy(self, conn: Any) -> None:
        self.waiting.pop(id(conn), None)

    def idle(self, conn: Any) -> None:
        if conn in self.open:
            self.waiting[id(conn)] = conn

    def forget(self, conn: Any) -> None:
        self.open.discard(conn)
        self.waiting.pop(id(conn), None)

    def to_dict(self) -> dict:
        return {"open": len(self.open), "waiting": len(self.waiting), "max_connections": self.limits.max_connections,
                **self.stats}


class _Guarded:
    """Mixin over a uvicorn HTTP protocol; ``registry`` is set on the class by :func:`guarded_protocol`."""

    registry: ConnectionRegistry

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._seen_cycle = None
        self._header_bytes = 0
        self._header_timer: Optional[asyncio.TimerHandle] = None
        if not self.registry.admit(self):
            transport.write(_TOO_MANY)
            transport.close()
            return
        self._arm_header_timer()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.registry.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is self._seen_cycle and self._between_requests() and not self.transport.is_closing():
            self.registry.stats["header_timeouts"] += 1
            self.registry.forget(self)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        waiting = self._between_requests()
        if waiting:
            self._arm_header_timer()
            self._header_bytes += len(data)
        super().data_received(data)
        if self.cycle is not self._seen_cycle:            # a request's headers completed
            self._seen_cycle = self.cycle
            self._header_bytes = 0
            self._cancel_header_timer()
            self.registry.busy(self)
        elif waiting and self._header_bytes > self.registry.limits.max_header_bytes \
                and not self.transport.is_closing():
            self.registry.stats["headers_too_large"] += 1
            self.registry.forget(self)
            self.transport.write(_HEADERS_TOO_LARGE)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not self._seen_cycle:            # h11 parsed a pipelined request just now
            self._seen_cycle = self.cycle
            self._cancel_header_timer()
        if self._between_requests() and not self.transport.is_closing():
            self._header_bytes = 0
            self.registry.idle(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        self.registry.forget(self)
        super().connection_lost(exc)


def guarded_protocol(base: type, registry: ConnectionRegistry) -> type:
    """A subclass of uvicorn's protocol class ``base`` with the limits of ``registry``."""
    return type(f"Guarded{base.__name__}", (_Guarded, base), {"registry": registry})
