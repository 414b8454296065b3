"""The ``ernie-vl`` command line.

Each subcommand lives in its own module ``ernie_vl/app/cli/<name>.py`` exposing
``register(subparsers)``; the parser below imports the ones listed in
``SUBCOMMANDS`` that exist, so a subcommand is added by adding its module and
its name here.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Sequence

from encoders.lazy import MissingExtraError

SUBCOMMANDS: tuple[str, ...] = (
    "list_models",
    "demo",
    "train",
    "evaluate",
    "classify",
    "eval_video",
    "eval_zeroshot",
    "linear_probe",
    "shard",
    "embed",
    "index",
    "search",
    "eval_retrieval",
    "serve",
    "quantize",
    "env",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ernie-vl",
        description="ERNIE-VL: image-text search and video action recognition on a shared MoE backbone.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module_name = f"{__name__}.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as err:
        print(f"ernie-vl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
