"""HTTP serving of embeddings and search with dynamic batching (FastAPI + uvicorn)."""
from ernie_vl.app.serve.app import ServerConfig, create_app
from ernie_vl.app.serve.batcher import BatchingConfig, DynamicBatcher
from ernie_vl.app.serve.connections import ConnectionLimits
from ernie_vl.app.serve.runner import ServerThread, run_server

__all__ = ["BatchingConfig", "ConnectionLimits", "DynamicBatcher", "ServerConfig", "ServerThread", "create_app", "run_server"]
