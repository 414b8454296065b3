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
no setting always runs first; the median of ``--rounds`` is reported with its ratio to ``linear``. With one
thread the clock is the thread's CPU time (every kernel runs in the calling thread, so it is the step's work,
and time spent waiting while other processes run on a shared machine does not count); with more, wall time. The goal
checked: the stem costs at most ``--max-ratio`` (default 1.5x) of the baseline's full-model step, so the
step budget the few-shot goals need still fits the 10-minute budget within the full model.

With one thread the run ends with a profile of the full-model step of ``tokenizer_diff`` and ``linear``
(``--profile-steps`` steps each, ``bench/_op_profile.py``): thread CPU time per aten op, forward and backward,
for the ops on 5-D tensors (the clips, the stem's feature maps, the 3-D patch embeddings), so the results
file says where the stem's time goes. What it showed, and what was done about it:

- the stem's 3x3x3 convolutions (oneDNN, channels-last input and output all the way through, forward and
  backward, weight gradients included) are the largest part and run near the core's fp32 FMA rate; the
  stride-2 blocks' input gradients run at about half their forward speed;
- batch norm and GELU of the first block (16 channels at T x H/2 x W/2, two million values per batch)
  come next: memory-bound passes over that feature map, forward and backward;
- the frame differences were built by two concatenations and then copied to channels-last: three full
  passes over the 6-channel input. They are now written in one pass into one channels-last tensor
  (``encoders.video_stem.frame_differences``), the same numbers bit for bit;
- the 1x1x1 patch embedding after tiny's three blocks ran as a convolution primitive whose fixed cost
  outweighed its few FLOPs; it is now one matrix product over the channels-last features (same sums);
- folding the differences into the first convolution's weights (a 4-frame kernel over the 3 pixel channels,
  exact with corrections at the first and last frames) was measured and not kept: oneDNN runs the 3-channel
  4-frame kernel only about 8% faster than the 6-channel 3-frame one, and the boundary corrections (single-
  frame convolutions and their gradients) cost more than that saves.

    .venv/bin/python bench/video_stem_cost.py --threads 1 --rounds 9 --steps 4
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _op_profile import clip_tensor_ms, five_d_rows, op_cpu_times  # noqa: E402
from _report import (Verdict, command_line, cost_table, machine, parse_step_cost_args, publish,  # noqa: E402
                     rotated_medians_by_clock, step_cost_parser)

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


def wall_lines(wall: dict, threads: int) -> list[str]:
    """Markdown: the full-model steps' wall times beside the CPU times (one thread; nothing otherwise, where the
    table above is wall time already)."""
    if threads != 1:
        return []
    base = wall["model", "linear"]
    return ["", "Wall time of the same full-model steps (a shared machine's load lengthens it): "
            + ", ".join(f"`{name}` {v:.1f} ms ({v / base:.2f}x)" for (kind, name), v in wall.items() if kind == "model")
            + "."]


def profile_lines(runs: dict, clips, labels, steps: int) -> list[str]:
    """Markdown: where the full-model step's CPU time goes with the frame-difference stem, per op on 5-D
    tensors, next to the linear embedding's totals (``bench/_op_profile.py``); nothing for ``steps`` 0."""
    if steps <= 0:
        return []
    times = {name: op_cpu_times(lambda step=runs["model", name]: step(clips, labels), steps)
             for name in ("tokenizer_diff", "linear")}

    batch = clips.shape[0]

    def totals(name: str) -> str:
        return (f"`{name}` {sum(times[name].values()):.1f} ms, {clip_tensor_ms(times[name], batch):.1f} ms of it "
                "on 5-D (B, C, T, H, W) tensors")

    return ["", f"Where the full-model step's time goes, thread CPU time per op over {steps} profiled steps "
            f"(forward and backward; time descheduled under other load does not count): {totals('tokenizer_diff')}; "
            f"{totals('linear')}. Those ops with the `tokenizer_diff` stem:", "",
            *five_d_rows(times["tokenizer_diff"], batch)]


def main() -> None:
    p = step_cost_parser(__doc__, batch=32)
    p.add_argument("--max-ratio", type=float, default=1.5)
    p.add_argument("--profile-steps", type=int, default=5,
                   help="full-model steps profiled per op after the timing (one thread only; 0: none)")
    args, load0, clips, labels = clip_batch(p)
    runs = {(kind, name): build(kind, stem)[1] for kind in ("bare", "model") for name, stem in SETTINGS.items()}
    # one thread: the verdict reads the thread's CPU time, which is the step's work on a quiet machine and stays
    # so on a shared one; wall time is measured around the same calls and shown beside it
    clocks = {"wall": time.perf_counter} | ({"cpu": time.thread_time} if args.threads == 1 else {})
    by_clock = rotated_medians_by_clock({key: (lambda step=step: step(clips, labels)) for key, step in runs.items()},
                                        args.rounds, args.steps, clocks)
    ms = by_clock["cpu" if args.threads == 1 else "wall"]
    profile = profile_lines(runs, clips, labels, args.profile_steps) if args.threads == 1 else []
    facts = machine(load0)
    lines = [f"# Cost of the video stem per training step (`tiny`, batch {args.batch} x {args.frames} frames x 32 px)",
             "", f"`{command_line('video_stem_cost.py')}`", "", facts.line(), "",
             f"Median of {args.rounds} rotated rounds of {args.steps} steps, {args.threads} thread(s); "
             + ("thread CPU time per step (with one thread every kernel runs in the calling thread; time the "
                "process waits while other processes run does not count). The goals read these." if args.threads == 1
                else "wall time per step."), "",
             *cost_table(ms, "linear"), *wall_lines(by_clock["wall"], args.threads), *profile]
    verdicts = [Verdict(f"full-model step with the {name} stem vs the linear embedding", f"<= {args.max_ratio}x",
                        f"{ms['model', name] / ms['model', 'linear']:.2f}x ({ms['model', name]:.0f} vs "
                        f"{ms['model', 'linear']:.0f} ms)", ms["model", name] / ms["model", "linear"] <= args.max_ratio)
                for name in SETTINGS if name != "linear"]
    publish(NAME, lines, verdicts, facts, command_line("video_stem_cost.py"))
    print(json.dumps({f"{k}:{n}": round(v, 1) for (k, n), v in ms.items()}))


if __name__ == "__main__":
    main()
