"""``ernie-vl shard CSV OUT/``: write the pairs of a ``filepath,caption`` CSV as WebDataset tar shards
(``OUT/00000.tar``, ...: ``{key}.jpg|png|webp`` + ``{key}.txt``), the format ``--pairs 'OUT/{00000..N}.tar'`` reads."""
from __future__ import annotations

import argparse
import json
import sys


def run(args: argparse.Namespace) -> int:
    from ernie_vl.data.shards import write_shards

    result = write_shards(args.csv, args.out, per_shard=args.per_shard, image_col=args.image_col,
                          caption_col=args.caption_col, progress=not args.no_progress)
    print(json.dumps({"pattern": result["pattern"], "shards": len(result["shards"]), "samples": result["samples"],
                      "skipped": [{"path": p, "reason": why} for p, why in result["skipped"]]}, indent=1))
    if result["skipped"]:
        print(f"{len(result['skipped'])} rows skipped (listed above)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("shard", help="write an image-text CSV as WebDataset tar shards", description=__doc__)
    p.add_argument("csv", help="CSV with a header and filepath,caption columns (paths relative to the CSV)")
    p.add_argument("out", help="output folder for 00000.tar, 00001.tar, ...")
    p.add_argument("--per-shard", type=int, default=10000, help="samples per shard (default 10000)")
    p.add_argument("--image-col", default="filepath")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
