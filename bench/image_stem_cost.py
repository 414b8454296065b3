"""What a convolutional tokenizer in `tiny`'s image encoder costs per training step, side by side in one process.

Times one optimiser step (forward, loss, backward, AdamW) on a batch of 32 px images (64 by default) for
each setting, two ways:

- ``bare``: the image encoder and a linear head alone, cross-entropy over 10 classes;
- ``pairs``: the whole ``tiny`` model on image-caption pairs (``ErnieVL.forward`` on an ``ErnieVLBatch``: image
  and text encoders, projectors, MoE backbone, CLIP loss), the step ``bench/train_digits.py`` trains with
  (its data loading aside);
- ``tokenizer``: the stem and the patch embedding alone (``ImageEncoder.embed_patches``, a squared-mean
  loss), where the memory layout is all that differs between ``stem`` and ``stem_contiguous``.

Settings: ``linear`` (the linear 4 px patch embedding, ``conv_stem=0``: tiny's image encoder as it is, the
baseline), ``stem`` (``image_encoder.conv_stem=[16, 32, 64]``: three 3x3 Conv2d / BatchNorm / GELU blocks,
strides 2, 2, 1, then a 1x1 patch embedding; the encoder runs them in channels-last memory) and
``stem_contiguous`` (the same stem run in the default contiguous layout, to check that choice). Rounds are
rotated so no setting always runs first; the median of ``--rounds`` is reported with its ratio to ``linear``.
The verdicts are reports (no goal was set): what the stem costs on images, and what channels-last gives.

    .venv/bin/python bench/image_stem_cost.py --threads 1 --rounds 7
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import (Verdict, command_line, cost_table, machine, parse_step_cost_args, publish,  # noqa: E402
                     rotated_medians, step_cost_parser)

NAME = "image_stem_cost"
STEM = [16, 32, 64]
SETTINGS = {"linear": 0, "stem": STEM, "stem_contiguous": STEM}


def build(kind: str, setting: str, batch: int):
    """(step, module) of one loop and setting; ``step()`` runs one optimiser step of ``module`` on fixed inputs."""
    import ernie_vl
    from ernie_vl.model import ErnieVLBatch

    model = ernie_vl.create_model("tiny", image_encoder={"conv_stem": SETTINGS[setting]})
    if setting == "stem_contiguous":
        model.image_encoder.stem = Contiguous(model.image_encoder.stem)
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    if kind == "tokenizer":
        enc = model.image_encoder
        module = nn.ModuleDict({"stem": enc.stem, "patch_embed": enc.patch_embed})

        def loss():
            return enc.embed_patches(images)[0].square().mean()
    elif kind == "bare":
        enc = model.image_encoder
        module = nn.ModuleDict({"encoder": enc, "head": nn.Linear(enc.cfg.output_dim, 10)})
        labels = torch.randint(10, (batch,))

        def loss():
            return nn.functional.cross_entropy(module["head"](module["encoder"](images).pooled), labels)
    else:
        module = model
        texts = model.tokenizer([f"a photo of the digit {i % 10}" for i in range(batch)])
        pairs = ErnieVLBatch(images=images, texts=texts)

        def loss():
            return model(pairs).loss
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def step():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step, module


class Contiguous(nn.Module):
    """Wraps a stem so that it runs on contiguous (NCHW) memory whatever layout the encoder hands it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous())


def main() -> None:
    args = parse_step_cost_args(step_cost_parser(__doc__, batch=64))
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    runs = {(kind, name): build(kind, name, args.batch)[0] for kind in ("bare", "pairs") for name in SETTINGS}
    runs.update({("tokenizer", name): build("tokenizer", name, args.batch)[0] for name in ("stem", "stem_contiguous")})
    ms = rotated_medians(runs, args.rounds, args.steps)
    facts = machine(load0)
    lines = [f"# Cost of the image stem per training step (`tiny`, batch {args.batch} x 32 px)", "",
             f"`{command_line('image_stem_cost.py')}`", "", facts.line(), "",
             (f"Median of {args.rounds} rotated rounds of {args.steps} steps, {args.threads} thread(s). `stem` is "
              f"`image_encoder.conv_stem={STEM}` as the encoder runs it (channels-last); `stem_contiguous` the same "
              "stem in the contiguous layout."), "",
             *cost_table(ms, "linear")]
    verdicts = [Verdict(f"{kind} step with the image stem vs the linear patch embedding", "report",
                        f"{ms[kind, 'stem'] / ms[kind, 'linear']:.2f}x ({ms[kind, 'stem']:.0f} vs "
                        f"{ms[kind, 'linear']:.0f} ms)", None) for kind in ("pairs", "bare")]
    verdicts += [Verdict(f"{kind} step with the stem in channels-last vs contiguous memory", "report",
                         f"{ms[kind, 'stem'] / ms[kind, 'stem_contiguous']:.2f}x ({ms[kind, 'stem']:.0f} vs "
                         f"{ms[kind, 'stem_contiguous']:.0f} ms)", None) for kind in ("tokenizer", "pairs", "bare")]
    publish(NAME, lines, verdicts, facts, command_line("image_stem_cost.py"))
    print(json.dumps({f"{k}:{n}": round(v, 1) for (k, n), v in ms.items()}))


if __name__ == "__main__":
    main()
