"""``ernie-vl list-models``: the presets with their sizes and parameter counts."""
from __future__ import annotations

import argparse
import json

import torch


def preset_summary(name: str) -> dict:
    """Sizes and parameter counts of one preset (built on the meta device: no memory, no init)."""
    from ernie_vl.presets import create_model

    with torch.device("meta"):
        model = create_model(name)
    cfg = model.cfg

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    total = count(model)
    inactive = 0
    for block in model.backbone.blocks:
        if block.is_moe:
            inactive += block.mlp.expert_params() - block.mlp.active_expert_params()
    return {
        "name": name,
        "params": total,
        "active_params": total - inactive,
        "image": f"{cfg.image_encoder.image_size[0]}px/{cfg.image_encoder.patch_size[0]} "
                 f"w{cfg.image_encoder.width} d{cfg.image_encoder.depth}",
        "video": f"{cfg.video_encoder.num_frames}x{cfg.video_encoder.image_size[0]}px {cfg.video_encoder.attention}",
        "backbone": f"d{cfg.backbone.depth} w{cfg.backbone.width}",
        "experts": f"{_experts(cfg.backbone.moe)} top-{cfg.backbone.moe.top_k} every {cfg.backbone.moe_every}"
        if cfg.backbone.moe_every and cfg.backbone.moe is not None else "dense",
        "embed_dim": cfg.head.embed_dim,
    }


def _experts(moe) -> str:
    """``8``, or ``4+4`` for modality groups (text+vision)."""
    if moe.routing == "groups":
        return "+".join(str(e) for e in moe.group_experts)
    return str(moe.num_experts)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e8 else f"{n / 1e6:.0f}M"


def format_table(rows: list[dict]) -> str:
    """A plain-text table with one row per preset."""
    header = ["name", "params", "active/token", "image", "video", "backbone", "experts", "embed"]
    lines = [[r["name"], _millions(r["params"]), _millions(r["active_params"]), r["image"], r["video"],
              r["backbone"], r["experts"], str(r["embed_dim"])] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def run(args: argparse.Namespace) -> int:
    from ernie_vl.presets import list_models

    rows = [preset_summary(name) for name in list_models()]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("list-models", help="list the model presets with parameter counts",
                                   description="List the model presets (ernie_vl.create_model names).")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
