"""What a convolutional stem in `tiny`'s video encoder costs per training step, side by side in one process.

Times one optimiser step (forward, cross-entropy, backward, AdamW) on a batch of clips (32 x 8 frames x
32 px by default) for each setting, two ways:

- ``bare``: the video encoder and a linear head alone (the few-shot bench's ``vit_ref*`` loop);
- ``model``: the whole ``tiny`` model (video encoder, projector, MoE backbone, classification head)
  through ``classify_video``, the video side of a full training step.

Settings: ``linear`` (the linear tubelet patch embedding, ``conv_stem=0``: tiny's video encoder before the
tokenizer became its default, the baseline), ``tokenizer`` (``conv_stem=[16, 32, 64]``), ``tokenizer_diff``
(the same fed frame differences too, ``frame_diff``: tiny's default) and the narrower frame-difference
tokenizers ``tokenizer_diff_12`` ([12, 24, 48]) and ``tokenizer_diff_8`` ([8, 16, 32]). Rounds are rotated so
no setting always runs first; the median of ``--rounds`` is reported with its ratio to ``linear``. The goal
checked: the stem costs at most ``--max-ratio`` (default 1.5x) of the baseline's full-model step, so the
step budget the few-shot goals need still fits the 10-minute budget within the full model.

    .venv/bin/python bench/video_stem_cost.py --threads 1 --rounds 7
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import (Verdict, command_line, cost_table, machine, parse_step_cost_args, publish,  # noqa: E402
                     rotated_medians, step_cost_parser)

NAME = "video_stem_cost"
SETTINGS = {"linear": 0, "tokenizer": [16, 32, 64], "tokenizer_diff": {"channels": [16, 32, 64], "frame_diff": True},
            "tokenizer_diff_12": {"channels": [12, 24, 48], "frame_diff": True},
            "tokenizer_diff_8": {"channels": [8, 16, 32], "frame_diff": True}}


def build(kind: str, conv_stem, num_classes: int = 8):
    """(module, step function) of one setting; ``step(clips, labels)`` runs one optimiser step."""
    import ernie_vl

    model = ernie_vl.create_model("tiny", class_names=[f"c{i}" for i in range(num_classes)],
                                  video_encoder={"conv_stem": conv_stem})
    return train_step(kind, model)


def train_step(kind: str, model):
    """(module, step function) of ``model``'s video path: ``bare`` (its video encoder and a new linear head) or
    ``model`` (``classify_video``); ``step(clips, labels)`` runs one AdamW step on cross-entropy."""
    import torch
    from torch import nn

    num_classes = model.classifier.out_features
    if kind == "bare":
        enc = model.video_encoder
        module = nn.ModuleDict({"encoder": enc, "head": nn.Linear(enc.cfg.output_dim, num_classes)})

        def logits(clips):
            return module["head"](module["encoder"](clips).pooled)
    else:
        module = model

        def logits(clips):
            return model.classify_video(clips)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def step(clips, labels):
        loss = nn.functional.cross_entropy(logits(clips), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return module, step


def clip_batch(p, num_classes: int = 8):
    """Parse ``p`` (a step-cost parser, given ``--frames`` here) and set the threads; returns (args, the 1-minute load
    before, a seeded batch of random clips (batch, frames, 3, 32, 32), their labels)."""
    import torch

    p.add_argument("--frames", type=int, default=8)
    args = parse_step_cost_args(p)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    return args, load0, torch.rand(args.batch, args.frames, 3, 32, 32), torch.randint(num_classes, (args.batch,))


def main() -> None:
    p = step_cost_parser(__doc__, batch=32)
    p.add_argument("--max-ratio", type=float, default=1.5)
    args, load0, clips, labels = clip_batch(p)
    runs = {(kind, name): build(kind, stem)[1] for kind in ("bare", "model") for name, stem in SETTINGS.items()}
    ms = rotated_medians({key: (lambda step=step: step(clips, labels)) for key, step in runs.items()},
                         args.rounds, args.steps)
    facts = machine(load0)
    lines = [f"# Cost of the video stem per training step (`tiny`, batch {args.batch} x {args.frames} frames x 32 px)",
             "", f"`{command_line('video_stem_cost.py')}`", "", facts.line(), "",
             f"Median of {args.rounds} rotated rounds of {args.steps} steps, {args.threads} thread(s).", "",
             *cost_table(ms, "linear")]
    verdicts = [Verdict(f"full-model step with the {name} stem vs the linear embedding", f"<= {args.max_ratio}x",
                        f"{ms['model', name] / ms['model', 'linear']:.2f}x ({ms['model', name]:.0f} vs "
                        f"{ms['model', 'linear']:.0f} ms)", ms["model", name] / ms["model", "linear"] <= args.max_ratio)
                for name in SETTINGS if name != "linear"]
    publish(NAME, lines, verdicts, facts, command_line("video_stem_cost.py"))
    print(json.dumps({f"{k}:{n}": round(v, 1) for (k, n), v in ms.items()}))


if __name__ == "__main__":
    main()
