"""``ernie-vl serve MODEL [--index INDEX] [--port 8000]``: HTTP embedding and search with dynamic batching."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve /embed/text, /embed/image, /search and /health over HTTP",
        description="Start a FastAPI + uvicorn server. Concurrent requests are batched dynamically: "
                    "gathered up to --max-batch-size items or --max-wait-ms and run as one forward pass.",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("--index", type=Path, default=None, help="index folder for /search")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="1 turns dynamic batching off (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted image upload")
    p.add_argument("--device", default=None)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import load_model, optional_device
    from ernie_vl.app.serve import BatchingConfig, ServerConfig, create_app, run_server
    from retrieval.index import Index

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    config = ServerConfig(batching=BatchingConfig(args.max_batch_size, args.max_wait_ms),
                          max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    loaded = load_model(args.model, device=optional_device(args.device))
    index = Index.load(args.index, model_id=loaded.model_id) if args.index is not None else None
    app = create_app(loaded.model, loaded.preprocess, loaded.tokenizer, loaded.model_id, index, config)
    print(f"serving {loaded.model_id} on http://{args.host}:{args.port} "
          f"(index: {len(index) if index is not None else 'none'}, batching: max {args.max_batch_size} "
          f"items / {args.max_wait_ms} ms)")
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
