"""``ernie-vl train``: train on image-text CSVs and labelled video folders; ``--nproc N`` launches torchrun."""
from __future__ import annotations

import argparse
import json
import subprocess

from ernie_vl.train.arguments import add_train_arguments, config_from_args


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validate here, before starting any worker
    if cfg.expert_parallel > 1:  # the world size must split into expert groups (the experts: at start)
        import os

        from ernie_vl.moe.expert_parallel import check_expert_parallel

        check_expert_parallel(cfg.expert_parallel, args.nproc if args.nproc > 1 else int(os.environ.get("WORLD_SIZE", "1")))
    if args.nproc > 1:
        from ernie_vl.train.distributed import torchrun_command

        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        config_path = cfg.out_dir / "train_config.json"
        config_path.write_text(json.dumps(cfg.to_dict(), indent=1))
        return subprocess.call(torchrun_command(args.nproc, ["--config", str(config_path)]))
    from ernie_vl.train import train

    result = train(cfg)
    summary = {"final": str(result.final_dir), "steps": result.steps, "seconds": round(result.seconds, 1),
               "samples_per_s": round(result.samples_per_s, 2), "loss": result.last_losses.get("loss"),
               **result.evaluation}
    print(json.dumps(summary, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an ErnieVL model on image-text pairs and labelled videos",
                              description=__doc__)
    add_train_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun, DDP on gloo/NCCL)")
    p.set_defaults(func=run)
