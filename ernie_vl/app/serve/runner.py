"""Run the app with uvicorn: in the foreground (``run_server``) or in a background thread (``ServerThread``).

Both serve through :func:`~ernie_vl.app.serve.connections.guarded_protocol` (header deadline, header
size cap, connection cap) with uvicorn's keep-alive timeout, backlog and optional
``limit_concurrency`` from the same :class:`~ernie_vl.app.serve.connections.ConnectionLimits`.
"""
from __future__ import annotations

import importlib.util
import threading
import time
from typing import Optional

import uvicorn
from fastapi import FastAPI

from ernie_vl.app.serve.connections import ConnectionLimits, ConnectionRegistry, guarded_protocol, raise_open_file_limit
from ernie_vl.train.distributed import free_port


def fast_io() -> tuple[str, str]:
    """uvicorn's (loop, http): uvloop and httptools (C parsers) when installed, else asyncio and h11."""
    installed = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return ("uvloop" if installed("uvloop") else "asyncio", "httptools" if installed("httptools") else "h11")


def _protocol_class(http: str) -> type:
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol
    return H11Protocol


def _config(app: FastAPI, host: str, port: int, log_level: str, limits: Optional[ConnectionLimits],
            http: Optional[str] = None) -> uvicorn.Config:
    loop, fast_http = fast_io()
    limits = (limits or ConnectionLimits()).resolved()
    registry = ConnectionRegistry(limits)
    app.state.connections = registry          # /health shows its counts
    protocol = guarded_protocol(_protocol_class(http or fast_http), registry)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          loop=loop, http=protocol, lifespan="on",
                          timeout_keep_alive=limits.keep_alive_timeout_s,
                          limit_concurrency=limits.limit_concurrency, backlog=limits.backlog,
                          h11_max_incomplete_event_size=limits.max_header_bytes)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               limits: Optional[ConnectionLimits] = None) -> None:
    """Serve ``app`` until interrupted (Ctrl-C); the open-file limit is raised to its hard limit first."""
    raise_open_file_limit()
    uvicorn.Server(_config(app, host, port, log_level, limits)).run()


class ServerThread:
    """``with ServerThread(app) as url:`` serves on loopback at a free port and stops on exit.

    ``http`` picks uvicorn's parser ("httptools" or "h11"; default: httptools when installed).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: Optional[int] = None,
                 log_level: str = "warning", startup_timeout_s: float = 30.0,
                 limits: Optional[ConnectionLimits] = None, http: Optional[str] = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(_config(app, self.host, self.port, log_level, limits, http))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.startup_timeout_s = startup_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
