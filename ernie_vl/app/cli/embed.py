"""``ernie-vl embed MODEL DATA --out EMB/``: embed images into resumable parts, on one or many processes.

DATA is a folder of images, a ``filepath,caption`` CSV or WebDataset shards (``'shards/{00000..00099}.tar'``).
Every rank (``--nproc N``, or an outer ``torchrun --nnodes ...``) embeds its own parts and writes
``EMB/part-RRRRR-SSSSS.npy`` + ``.jsonl`` (metadata) + ``.json`` (summary); a rerun skips finished
parts. ``ernie-vl index EMB/ --out INDEX`` builds a search index from them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def list_items(data: str, image_col: str = "filepath", caption_col: str = "caption") -> tuple[list[str], list[dict], dict]:
    """(items for the opener, metadata per item, info for the manifest) of a folder, a CSV or shards."""
    from ernie_vl.data.shards import ShardError, is_shard_spec, shard_list, shard_sample_names
    from retrieval.datasets import ImageTextCSV, list_image_files

    if is_shard_spec(data):
        items: list[str] = []
        bad: list[list[str]] = []
        for shard in shard_list(data):
            try:
                items.extend(shard_sample_names(shard))
            except ShardError as err:   # one unreadable shard never stops the job: listed in the manifest
                bad.append([shard, err.reason])
        if not items:
            raise ValueError(f"no readable samples in the shards {data!r}; e.g. {bad[:3]}")
        metas = [dict(zip(("shard", "key"), name.rsplit("#", 1))) for name in items]
        return items, metas, {"source": data, "unreadable_shards": bad}
    path = Path(data)
    if path.is_dir():
        root = path.resolve()
        files = list_image_files(root)
        return [str(f) for f in files], [{"path": f.relative_to(root).as_posix()} for f in files], {"root": str(root)}
    if path.is_file():
        table = ImageTextCSV(path, None, image_col=image_col, caption_col=caption_col)
        root = path.resolve().parent
        metas = []
        for p, caption in zip(table.paths, table.captions):
            try:
                rel = Path(p).resolve().relative_to(root).as_posix()
            except ValueError:
                rel = str(p)
            metas.append({"path": rel, "caption": caption})
        return [str(p) for p in table.paths], metas, {"root": str(root), "source": str(path.resolve())}
    raise ValueError(f"DATA {data!r} is not an image folder, a CSV file or a .tar shard pattern")


def _opener(data: str):
    from ernie_vl.data.shards import ShardImageOpener, is_shard_spec
    from retrieval.images import load_image

    return ShardImageOpener() if is_shard_spec(data) else load_image


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = ["embed", args.model, args.data, "--out", str(args.out), "--part-size", str(args.part_size),
           "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--image-col", args.image_col, "--caption-col", args.caption_col]
    if args.device:
        out += ["--device", args.device]
    return out + (["--no-progress"] if args.no_progress else [])


def run(args: argparse.Namespace) -> int:
    if args.part_size < 1:
        raise ValueError(f"--part-size must be >= 1, got {args.part_size}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:
        from ernie_vl.train.distributed import torchrun_command

        return subprocess.call(torchrun_command(args.nproc, _worker_args(args), module="ernie_vl"))
    import torch.distributed as dist

    from ernie_vl.app.hub import load_model, model_spec_for_manifest
    from ernie_vl.train.distributed import init_distributed, shutdown_distributed
    from retrieval.embed_parts import embed_to_parts
    from retrieval.names import json_text, printable
    from retrieval.parts import finished_parts

    items, metas, info = list_items(args.data, args.image_col, args.caption_col)
    ctx = init_distributed(args.device)
    try:
        loaded = load_model(args.model, device=str(ctx.device))
        report = embed_to_parts(
            loaded.model, items, metas, args.out, rank=ctx.rank, world_size=ctx.world_size,
            part_size=args.part_size, dtype=args.dtype, model_id=loaded.model_id, opener=_opener(args.data),
            preprocess=loaded.preprocess, batch_size=args.batch_size, num_workers=args.workers,
            barrier=dist.barrier if ctx.distributed else None,
            info={**info, "model_spec": model_spec_for_manifest(args.model)}, progress=not args.no_progress,
        )
    finally:
        shutdown_distributed()
    if ctx.rank != 0:
        return 0
    skipped = [s for p in finished_parts(args.out).values() for s in p.skipped]
    summary = {"out": str(args.out), "items": len(items), "parts": report.parts_total,
               "finished": report.manifest is not None, "embedded_now": report.embedded,
               "parts_embedded_by_rank0": report.parts_done, "parts_reused_by_rank0": report.parts_reused,
               "embedded": (report.manifest or {}).get("embedded"),
               "skipped": [{"item": i, "reason": r} for i, r in skipped],
               "unreadable_shards": [{"shard": x, "reason": r} for x, r in info.get("unreadable_shards", [])]}
    print(json_text(summary, indent=1))
    for item, reason in skipped + [tuple(x) for x in info.get("unreadable_shards", [])]:
        print(printable(f"  skipped {item}: {reason}"), file=sys.stderr)
    return 0 if report.manifest is not None else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="embed images into resumable parts (many processes with --nproc / torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("data", help="image folder, filepath,caption CSV, or WebDataset shards ('dir/{00000..00009}.tar')")
    p.add_argument("--out", type=Path, required=True, help="parts folder to write (a rerun resumes)")
    p.add_argument("--part-size", type=int, default=10000, help="items per part (default 10000)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored vectors (default float16)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (launched through torchrun)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images per process (default 2)")
    p.add_argument("--image-col", default="filepath")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
