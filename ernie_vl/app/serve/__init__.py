"""HTTP serving of embeddings and search with dynamic batching (FastAPI + uvicorn: the ``serve`` extra)."""
from encoders.lazy import require

require("fastapi", "serve", "the HTTP server (ernie-vl serve)")
require("uvicorn", "serve", "the HTTP server (ernie-vl serve)")
try:  # python-multipart's import name since 0.0.13, then its older one
    import python_multipart  # noqa: F401
except ImportError:
    require("multipart", "serve", "the HTTP server's uploads (ernie-vl serve)")
from ernie_vl.app.serve.app import ServerConfig, create_app
from ernie_vl.app.serve.batcher import BatchingConfig, DynamicBatcher
from ernie_vl.app.serve.connections import ConnectionLimits
from ernie_vl.app.serve.runner import ServerThread, run_server

__all__ = ["BatchingConfig", "ConnectionLimits", "DynamicBatcher", "ServerConfig", "ServerThread", "create_app", "run_server"]
