"""What a training step costs when a pair-trained `tiny` starts its video path with ``--video-init image``
(inflated from the image encoder) against ``keep`` (its own video encoder), side by side in one process, and why.

The two video paths (the same ``tiny``, random weights: cost does not depend on their values):

- ``keep``: the preset's video encoder (8 px patches: 4x4 tokens per time step, one shared class token) and its
  video projector (a resampler with 8 queries);
- ``image``: ``ernie_vl.inflate_video_from_image``: the image encoder's geometry (4 px patches: 8x8 tokens per
  time step, one class token per time step; the image tokenizer's third block unstrided in space, so it runs on
  4x the positions) and a copy of the image projector (16 queries, so 16 video tokens into the MoE backbone).

Per step on a batch of clips (32 x 8 frames x 32 px, as the few-shot bench trains), two loops:

- ``encoder``: the video encoder and a linear head (forward, cross-entropy, backward, AdamW);
- ``trainer``: the trainer's video step: ``ErnieVL.forward`` with labels and class prompts (the supervised head
  on the encoder's pooled features, plus video-text contrastive through projector, MoE backbone and text path),
  backward, AdamW.

Reported: milliseconds per step (median of ``--rounds`` rotated rounds; load-dependent, the ratio measured side
by side is the figure), multiply-add FLOPs per clip counted by ``torch.utils.flop_counter`` (forward and backward,
load-independent), the forward FLOPs by part (stem, rest of the video encoder, projector, backbone) and the tokens
each part sees.

    .venv/bin/python bench/video_init_cost.py --threads 1 --rounds 7
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import (Verdict, command_line, cost_table, machine, publish, rotated_medians,  # noqa: E402
                     step_cost_parser)
from video_stem_cost import clip_batch, train_step  # noqa: E402

NAME = "video_init_cost"
CLASSES = [f"c{i}" for i in range(8)]
PARTS = {"VideoEncoder.stem": "stem", "VideoEncoder": "video encoder", "Resampler": "projector",
         "SharedBackbone": "backbone"}  # flop counter's module names -> table rows (forward)


def models() -> dict:
    """{"keep": tiny, "image": tiny with its video path inflated from its image path}."""
    import ernie_vl
    from ernie_vl.inflate import inflate_video_from_image

    model = ernie_vl.create_model("tiny", class_names=CLASSES)
    return {"keep": model, "image": inflate_video_from_image(model)}


def trainer_step(model, prompts):
    """One step of the trainer's video loss: ``step(clips, labels)`` (forward, backward, AdamW)."""
    import torch

    from ernie_vl.model import ErnieVLBatch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(clips, labels):
        out = model(ErnieVLBatch(videos=clips, video_labels=labels, video_texts=prompts[labels]))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def geometry(model, clips) -> dict:
    """Tokens per clip: the video encoder's output tokens (time steps x patches + class tokens), its patch size,
    class-token mode, and the video tokens the projector hands to the backbone."""
    import torch

    with torch.no_grad():
        tokens = model.video_encoder(clips[:1]).tokens.shape[1]
    cfg = model.cfg
    return {"patch_size": list(cfg.video_encoder.patch_size), "cls_mode": cfg.video_encoder.cls_mode,
            "encoder_tokens": int(tokens), "backbone_video_tokens": cfg.video_projector.num_queries}


def flops_per_clip(step, clips, labels) -> float:
    """Forward + backward FLOPs of one ``step`` per clip, in millions."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(clips, labels)
    return counter.get_total_flops() / (clips.shape[0] * 1e6)


def forward_parts(model, clips) -> dict:
    """Forward FLOPs per clip (millions) of the video embedding path, by part (``PARTS``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model.video_features(clips, routing=False)
    counts = counter.get_flop_counts()
    return {label: sum(counts.get(key, {}).values()) / (clips.shape[0] * 1e6) for key, label in PARTS.items()}


def main() -> None:
    import ernie_vl

    args, load0, clips, labels = clip_batch(step_cost_parser(__doc__, batch=32), len(CLASSES))
    built = models()
    tok = ernie_vl.get_tokenizer(built["keep"])
    prompts = tok([f"a video of {c}" for c in CLASSES])
    steps = {}
    for name, model in built.items():
        steps["encoder", name] = train_step("bare", model)[1]
        steps["trainer", name] = trainer_step(model, prompts)
    geo = {name: geometry(model, clips) for name, model in built.items()}
    small = clips[:4], labels[:4]  # FLOPs scale with the batch: counted on 4 clips, per clip
    flops = {key: flops_per_clip(step, *small) for key, step in steps.items()}
    parts = {name: forward_parts(model, small[0]) for name, model in built.items()}
    ms = rotated_medians({key: (lambda step=step: step(clips, labels)) for key, step in steps.items()},
                         args.rounds, args.steps)
    facts = machine(load0)
    lines = [f"# `--video-init image` vs `keep`: cost per training step (`tiny`, batch {args.batch} x {args.frames} "
             "frames x 32 px)", "", f"`{command_line('video_init_cost.py')}`", "", facts.line(), "",
             f"Median of {args.rounds} rotated rounds of {args.steps} steps, {args.threads} thread(s).", "",
             *cost_table(ms, "keep"), "",
             "| setting | patch | class tokens | encoder tokens / clip | video tokens into backbone | "
             "MFLOP / clip, encoder step | MFLOP / clip, trainer step | "
             + " | ".join(f"forward {v} MFLOP / clip" for v in PARTS.values()) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PARTS)]
    for name, g in geo.items():
        lines.append(f"| {name} | {g['patch_size'][0]} px | {g['cls_mode']} | {g['encoder_tokens']} | "
                     f"{g['backbone_video_tokens']} | {flops['encoder', name]:.1f} | {flops['trainer', name]:.1f} | "
                     + " | ".join(f"{parts[name][v]:.1f}" for v in PARTS.values()) + " |")
    lines += ["", "FLOPs: `torch.utils.flop_counter` (matrix products and convolutions, 2 per multiply-add), "
              "forward and backward of one step; the parts are forward only (the video encoder's row includes "
              "its stem)."]
    verdicts = [Verdict(f"{loop} step, image vs keep", "report",
                        f"{ms[loop, 'image'] / ms[loop, 'keep']:.2f}x time ({ms[loop, 'image']:.0f} vs "
                        f"{ms[loop, 'keep']:.0f} ms), {flops[loop, 'image'] / flops[loop, 'keep']:.2f}x FLOPs", None)
                for loop in ("encoder", "trainer")]
    publish(NAME, lines, verdicts, facts, command_line("video_init_cost.py"))
    print(json.dumps({"ms": {f"{k}:{n}": round(v, 1) for (k, n), v in ms.items()}, "geometry": geo}))


if __name__ == "__main__":
    main()
