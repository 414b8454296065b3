"""``torchrun --nproc_per_node N -m ernie_vl.train --pairs ... --out ...`` (same flags as ``ernie-vl train``,
or ``--config run.json`` holding a ``TrainConfig``)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from ernie_vl.train.arguments import add_train_arguments, config_from_args
    from ernie_vl.train import train
    from ernie_vl.train.distributed import shutdown_distributed

    from ernie_vl.train.config import TrainConfig

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None, help="a TrainConfig as JSON (what `ernie-vl train --nproc N` passes)")
    known, rest = pre.parse_known_args(argv)
    try:
        if known.config:
            with open(known.config, encoding="utf-8") as f:
                cfg = TrainConfig.from_dict(json.load(f))
        else:
            parser = argparse.ArgumentParser(prog="python -m ernie_vl.train", description=__doc__)
            add_train_arguments(parser)
            cfg = config_from_args(parser.parse_args(rest))
        result = train(cfg)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"ernie_vl.train: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"final": str(result.final_dir), "steps": result.steps,
                          "samples_per_s": round(result.samples_per_s, 2), **result.evaluation}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
