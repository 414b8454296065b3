"""``ernie-vl serve MODEL [--index INDEX] [--port 8000]``: HTTP embedding and search with dynamic batching."""
from __future__ import annotations

import argparse
from pathlib import Path

from ernie_vl.precision import PRECISIONS

MB = 1024 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve /embed/text, /embed/image, /search and /health over HTTP",
        description="Start a FastAPI + uvicorn server. Concurrent requests are batched dynamically: "
                    "gathered up to --max-batch-size items or --max-wait-ms and run as one forward pass. "
                    "Bodies, images, headers and connections are bounded (see SECURITY.md).",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("--index", type=Path, default=None, help="index folder for /search")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="1 turns dynamic batching off (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (default 5)")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default), bf16 (autocast; fast on CPUs with AVX512-BF16 / AMX) or int8")
    p.add_argument("--log-level", default="info")
    lim = p.add_argument_group("limits (what one client can make the server hold)")
    lim.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image file (default 10)")
    lim.add_argument("--max-body-mb", type=float, default=32.0,
                     help="largest multipart body, counted while it streams, chunked included (default 32)")
    lim.add_argument("--max-json-kb", type=float, default=1024.0, help="largest JSON / other body (default 1024)")
    lim.add_argument("--max-image-pixels", type=int, default=None,
                     help="largest decoded image; default 256x the model's input pixels within 2048^2..4096^2")
    lim.add_argument("--decode-workers", type=int, default=None, help="images decoded at once (default: cores)")
    lim.add_argument("--timeout-body", type=float, default=30.0,
                     help="seconds without body data before 408 (default 30)")
    lim.add_argument("--timeout-headers", type=float, default=10.0,
                     help="seconds to finish a request's headers before the connection is closed (default 10)")
    lim.add_argument("--timeout-keep-alive", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open (default 5)")
    lim.add_argument("--max-header-kb", type=float, default=16.0, help="largest request head (default 16)")
    lim.add_argument("--max-connections", type=int, default=None,
                     help="open connections; over it the longest-idle one is closed (default 4096, "
                          "or less under a low open-file limit)")
    lim.add_argument("--limit-concurrency", type=int, default=None,
                     help="uvicorn's: 503 once this many connections or requests are open (default off)")
    lim.add_argument("--backlog", type=int, default=2048, help="listen backlog (default 2048)")
    p.set_defaults(func=run)


def configs_from_args(args: argparse.Namespace):
    """(ServerConfig, ConnectionLimits) from the parsed flags; ValueError names a bad one."""
    from ernie_vl.app.serve import BatchingConfig, ConnectionLimits, ServerConfig

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_upload_mb", "max_body_mb", "max_json_kb", "max_header_kb"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    config = ServerConfig(batching=BatchingConfig(args.max_batch_size, args.max_wait_ms),
                          max_upload_bytes=int(args.max_upload_mb * MB), max_form_bytes=int(args.max_body_mb * MB),
                          max_json_bytes=int(args.max_json_kb * 1024), body_timeout_s=args.timeout_body,
                          max_image_pixels=args.max_image_pixels, decode_workers=args.decode_workers)
    limits = ConnectionLimits(header_timeout_s=args.timeout_headers, keep_alive_timeout_s=args.timeout_keep_alive,
                              max_header_bytes=int(args.max_header_kb * 1024), max_connections=args.max_connections,
                              limit_concurrency=args.limit_concurrency, backlog=args.backlog)
    return config, limits


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import load_model, optional_device
    from ernie_vl.app.serve import create_app, run_server
    from retrieval.index import Index

    config, limits = configs_from_args(args)
    loaded = load_model(args.model, device=optional_device(args.device), precision=args.precision)
    index = Index.load(args.index, model_id=loaded.model_id) if args.index is not None else None
    app = create_app(loaded.model, loaded.preprocess, loaded.tokenizer, loaded.model_id, index, config)
    decoder = app.state.service.decoder
    print(f"serving {loaded.model_id} ({args.precision}) on http://{args.host}:{args.port} "
          f"(index: {len(index) if index is not None else 'none'}, batching: max {args.max_batch_size} "
          f"items / {args.max_wait_ms} ms; images up to {decoder.max_pixels} pixels, {decoder.workers} at once)")
    run_server(app, host=args.host, port=args.port, log_level=args.log_level, limits=limits)
    return 0
