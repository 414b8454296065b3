"""An ASGI wrapper that bounds every request body and keeps errors from closing connections.

- **Body limit, counted while streaming.** A declared ``content-length`` over the limit is answered
  413 before the app runs. Otherwise ``receive`` is wrapped and counts the bytes as they arrive
  (chunked uploads included): the moment the count passes the limit the client gets 413 with
  ``connection: close`` and the app's next ``receive`` sees ``http.disconnect``, so nothing past the
  limit is ever handed to a parser or written to disk. Multipart bodies get ``form_limit``, every
  other body ``json_limit``.
- **Body idle timeout.** A client that stops sending in the middle of its body gets 408 after
  ``idle_timeout_s`` without a byte.
- **Errors never reach the connection.** An exception the app lets out after it has answered is
  logged and dropped (uvicorn would otherwise close the keep-alive connection, so the client's next
  request fails with ECONNRESET); before it has answered, the client gets a short 500 with no
  exception text.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("ernie_vl.app.serve")


@dataclass
class BodyStats:
    """What the guard refused: counts shown by ``/health``."""

    too_large: int = 0
    timed_out: int = 0
    internal_errors: int = 0

    def to_dict(self) -> dict:
        return {"too_large": self.too_large, "timed_out": self.timed_out, "internal_errors": self.internal_errors}


def error_messages(status: int, message: str, close: bool = False) -> tuple[Message, Message]:
    """The two ASGI messages of a JSON ``{"error": message}`` response (ASCII, so always encodable)."""
    body = json.dumps({"error": message}).encode("ascii")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


async def _within(receive: Receive, seconds: float) -> Optional[Message]:
    """``await receive()``, or None after ``seconds``: a timer that cancels this task, as
    ``asyncio.timeout`` does (Python 3.11+), without the task ``asyncio.wait_for`` creates per call."""
    task = asyncio.current_task()
    fired = []

    def expire() -> None:
        fired.append(True)
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await receive()
    except asyncio.CancelledError:
        if not fired:
            raise
        if hasattr(task, "uncancel"):
            task.uncancel()
        return None
    finally:
        handle.cancel()


class _Exchange:
    """One request: the counting ``receive``, the ``send`` that drops what follows a refusal."""

    def __init__(self, receive: Receive, send: Send, limit: int, idle_timeout_s: float, stats: BodyStats) -> None:
        self._receive, self._send = receive, send
        self.limit, self.idle_timeout_s, self.stats = limit, idle_timeout_s, stats
        self.received = 0
        self.body_done = False
        self.refused = False
        self.started = self.completed = False

    async def refuse(self, status: int, message: str) -> None:
        self.refused = True
        if not self.started:
            for m in error_messages(status, message, close=True):
                await self.send(m)

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_done:
            return await self._receive()
        message = await _within(self._receive, self.idle_timeout_s)
        if message is None:
            self.stats.timed_out += 1
            await self.refuse(408, f"no request body data for {self.idle_timeout_s:g} s")
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.stats.too_large += 1
                await self.refuse(413, f"the request body is larger than {self.limit} bytes")
                return {"type": "http.disconnect"}
            self.body_done = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if self.completed:
            return                     # a refusal already answered: what the app sends after is dropped
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.completed = True
        await self._send(message)


class BodyGuard:
    """``BodyGuard(app, json_limit, form_limit, idle_timeout_s)``: the wrapper described above.

    Installed with ``app.add_middleware(BodyGuard, ...)`` it sits inside Starlette's error
    middleware, so it also turns exceptions the routes let out into its short 500.
    """

    def __init__(self, app: Callable, json_limit: int, form_limit: int, idle_timeout_s: float = 30.0,
                 stats: Optional[BodyStats] = None) -> None:
        for name, value in (("json_limit", json_limit), ("form_limit", form_limit), ("idle_timeout_s", idle_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.app, self.json_limit, self.form_limit, self.idle_timeout_s = app, int(json_limit), int(form_limit), idle_timeout_s
        self.stats = stats if stats is not None else BodyStats()

    def limit_for(self, scope: Scope) -> int:
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
        return self.form_limit if ctype.lower().startswith(b"multipart/form-data") else self.json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        exchange = _Exchange(receive, send, limit, self.idle_timeout_s, self.stats)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await exchange.refuse(400, "content-length must be a non-negative integer")
                return
            if int(declared) > limit:
                self.stats.too_large += 1
                await exchange.refuse(413, f"a request body of {int(declared)} bytes; the limit is {limit}")
                return
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:
            if exchange.completed:     # answered already (a refusal, or the app's own 500): keep the connection
                if not exchange.refused:
                    self.stats.internal_errors += 1
                    log.exception("error after the response to %s %s", scope.get("method"), scope.get("path"))
                return
            self.stats.internal_errors += 1
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if exchange.started:
                raise                  # half a response went out: only closing the connection is honest
            for m in error_messages(500, "internal error"):
                await send(m)
