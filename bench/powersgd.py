"""PowerSGD gradient compression, measured on our presets (BRIEF.md claim 5: traffic cut to 1/32).

For each preset and PowerSGD rank, one DDP process on gloo runs PyTorch's PowerSGD hook behind
``ernie_vl.train.distributed.PowerSGDMeter`` for the warm-up steps plus one compressed step on a
random batch, and reports the gradient elements plain all-reduce would send against what PowerSGD
sends (its P and Q factors plus the tensors it leaves uncompressed). The ratio depends on the
parameter shapes only (not on the data or the number of processes), so one process measures it.
Writes bench/results/powersgd.md and .json.

    .venv/bin/python bench/powersgd.py                     # tiny and base, ranks 1 / 4 / 8
    .venv/bin/python bench/powersgd.py --presets tiny      # seconds
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ernie_vl  # noqa: E402
from ernie_vl.model import ErnieVLBatch  # noqa: E402
from ernie_vl.train.distributed import PowerSGDMeter, free_port  # noqa: E402

from _report import Verdict, command_line, machine, write_results  # noqa: E402

CLAIM = 32.0  # BRIEF.md #5: gradient traffic cut to 1/32


def random_batch(model, batch: int = 2) -> ErnieVLBatch:
    """Images, captions, clips and labels of the model's sizes (values do not matter for the counts)."""
    cfg = model.cfg
    hw = lambda s: tuple(s) if isinstance(s, (tuple, list)) else (s, s)  # noqa: E731
    size, vsize = hw(cfg.image_encoder.image_size), hw(cfg.video_encoder.image_size)
    frames = cfg.video_encoder.num_frames
    ctx = cfg.text.context_length
    g = torch.Generator().manual_seed(0)
    texts = torch.randint(1, 1000, (batch, ctx), generator=g)
    return ErnieVLBatch(images=torch.randn(batch, 3, *size, generator=g), texts=texts,
                        videos=torch.randn(batch, frames, 3, *vsize, generator=g),
                        video_labels=torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=g),
                        video_texts=texts)


def measure(preset: str, rank: int, warmup: int = 2) -> dict:
    """Dense and sent gradient elements of one compressed step of ``preset`` at PowerSGD ``rank``."""
    torch.manual_seed(0)
    model = ernie_vl.create_model(preset)
    params = sum(p.numel() for p in model.parameters())
    # the trainer's wrap (ernie_vl.train.distributed.wrap_model) skips DDP for one process, so wrap here as it does
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    meter = PowerSGDMeter(rank, warmup, serialize=True)
    ddp.register_comm_hook(meter.state, meter.hook)
    batch = random_batch(model)
    start = time.perf_counter()
    counts = {}
    for _ in range(warmup + 1):
        ddp.zero_grad(set_to_none=True)
        ddp(batch).loss.backward()
        counts = meter.take_step_counts()
    assert counts["compressing"], "the last step must be a compressed one"
    return {"params": params, "dense": counts["grad_elements_dense"], "sent": counts["grad_elements_sent"],
            "ratio": counts["compression_ratio"], "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows, verdicts = [], []
    try:
        for preset in args.presets:
            for rank in args.ranks:
                r = measure(preset, rank)
                rows.append((preset, rank, r))
                print(f"{preset} rank {rank}: {r['dense']:,} -> {r['sent']:,} elements, {r['ratio']:.1f}x", flush=True)
    finally:
        dist.destroy_process_group()
    facts = machine(load_before)
    lines = ["# PowerSGD gradient compression", "", f"Command: `{command_line('powersgd.py')}`", "", facts.line(), "",
             "One DDP process on gloo with PyTorch's PowerSGD hook (error feedback, warm start, 2 warm-up steps), "
             "counted by `PowerSGDMeter` on the first compressed step. Elements, not bytes: both sides send float32. "
             "The brief claims 32x (1/32 of the traffic).", "",
             "| preset | parameters | PowerSGD rank | elements plain all-reduce | elements PowerSGD | compression |",
             "|---|---:|---:|---:|---:|---:|"]
    for preset, rank, r in rows:
        lines.append(f"| {preset} | {r['params'] / 1e6:.2f}M | {rank} | {r['dense']:,} | {r['sent']:,} | "
                     f"**{r['ratio']:.1f}x** |")
    for preset in args.presets:
        best = max((r for p, _, r in rows if p == preset), key=lambda r: r["ratio"])
        best_rank = next(k for p, k, r in rows if p == preset and r is best)
        verdicts.append(Verdict(f"PowerSGD compression of gradient traffic, `{preset}` (best of ranks "
                                f"{', '.join(map(str, args.ranks))})", f">= {CLAIM:.0f}x (the brief's claim)",
                                f"{best['ratio']:.1f}x at rank {best_rank}", best["ratio"] >= CLAIM, claim="5"))
    write_results("powersgd", "\n".join(lines), verdicts, facts, command_line("powersgd.py"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
