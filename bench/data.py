"""Training input throughput: ours (decode once into uint8, then index) against torchvision ImageFolder + DataLoader.

For each set size (default 20,000 and 200,000 images of 32x32 PNG in 100 class folders, generated
once into ``.cache/bench_data/``): images/s delivered to the model as normalised float batches
(B,3,32,32), over ``--epochs`` shuffled epochs, decoding included, with the same worker count,
batch size and the model's own transform on both sides:

- ours: ``ernie_vl.data.sources.CachedPairs`` (decode in workers into one preallocated uint8
  array, then each batch is one index + one fused multiply-add);
- anchor: ``torchvision.datasets.ImageFolder`` + ``DataLoader(shuffle=True)``, the plain pipeline that
  decodes every image every epoch (its best settings: persistent workers, pinned off on CPU,
  prefetch 2).

Each method runs in its own subprocess (so its peak RSS, and its workers', are its own);
rounds alternate who goes first. Peak RSS is compared with the training memory budget
(``TrainConfig.cache_max_mb``) at the largest size.

    .venv/bin/python bench/data.py            # 20k and 200k
    .venv/bin/python bench/data.py --counts 20000 --rounds 3         # smaller
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (the script's folder), whose encoders.py would shadow the package

from _report import Verdict, command_line, machine, write_results  # noqa: E402

CACHE = ROOT / ".cache" / "bench_data"
CLASSES = 100


def make_images(root: Path, count: int, size: int = 32) -> Path:
    """``count`` PNGs in ROOT/<class>/ (ImageFolder layout) and ROOT/pairs.csv (kept once written); returns ROOT."""
    import numpy as np
    from PIL import Image

    done = root / "pairs.csv"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    lines = ["filepath,caption"]
    base = rng.integers(0, 256, (CLASSES, size, size, 3), dtype=np.uint8)
    for i in range(count):
        c = i % CLASSES
        folder = root / f"c{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(-40, 40, (size, size, 3))
        img = np.clip(base[c].astype(np.int64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:07d}.png", compress_level=1)
        lines.append(f"c{c:03d}/{i:07d}.png,pattern number {c}")
    tmp = root / ".pairs.csv.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, done)
    return root


def run_one(method: str, root: Path, workers: int, batch: int, epochs: int) -> dict:
    """One measurement in this process: images/s over ``epochs`` epochs, decoding included."""
    import resource

    import torch

    import ernie_vl

    torch.set_num_threads(1)
    model = ernie_vl.create_model("tiny")
    pre = model.preprocess
    t0 = time.perf_counter()
    delivered = 0
    checksum = 0.0
    if method == "ours":
        from ernie_vl.data.sources import CachedPairs

        pairs = CachedPairs([root / "pairs.csv"], pre, model.tokenizer, num_workers=workers, progress=False)
        decode_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(pairs), generator=g)
            for s in range(0, len(order) - batch + 1, batch):
                images, _ = pairs.batch(order[s:s + batch])
                delivered += len(images)
                checksum += float(images[0, 0, 0, 0])
    else:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        data = ImageFolder(str(root), transform=pre)
        loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
        decode_s = 0.0
        for _ in range(epochs):
            for images, _ in loader:
                delivered += len(images)
                checksum += float(images[0, 0, 0, 0])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"method": method, "images_per_s": delivered / seconds, "seconds": seconds, "decode_s": decode_s,
            "delivered": delivered, "peak_rss_mb": peak, "worker_peak_rss_mb": worker_peak, "checksum": checksum}


def measure(method: str, root: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--root", str(root), "--workers", str(args.workers),
           "--batch", str(args.batch), "--epochs", str(args.epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (training reads data many times)")
    p.add_argument("--rounds", type=int, default=5, help="rounds at sizes <= 50k (1 above, for time)")
    p.add_argument("--one", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.root, args.workers, args.batch, args.epochs)))
        return

    import statistics

    from ernie_vl.train.config import TrainConfig

    budget = TrainConfig.__dataclass_fields__["cache_max_mb"].default
    load_before = os.getloadavg()[0]
    start = time.time()
    sections, verdicts = [], []
    for count in args.counts:
        t = time.time()
        root = make_images(CACHE / f"png32-{count}", count)
        made = time.time() - t
        rounds = args.rounds if count <= 50000 else 1
        results: dict[str, list[dict]] = {"ours": [], "torchvision": []}
        for r in range(rounds):
            order = ("ours", "torchvision") if r % 2 == 0 else ("torchvision", "ours")
            for method in order:
                results[method].append(measure(method, root, args))
                print(count, r, method, round(results[method][-1]["images_per_s"]), flush=True)
        med = {m: statistics.median(x["images_per_s"] for x in v) for m, v in results.items()}
        ratio = med["ours"] / med["torchvision"]
        per_round = [o["images_per_s"] / a["images_per_s"] for o, a in zip(results["ours"], results["torchvision"])]
        peak = {m: max(x["peak_rss_mb"] for x in v) for m, v in results.items()}
        wpeak = {m: max(x["worker_peak_rss_mb"] for x in v) for m, v in results.items()}
        decode = statistics.median(x["decode_s"] for x in results["ours"])
        rows = ["| method | images/s (median) | peak RSS MB, main process | peak RSS MB, largest worker |",
                "|---|---:|---:|---:|"]
        rows.append(f"| ours: CachedPairs (decode once to uint8, then index) | {med['ours']:.0f} | {peak['ours']:.0f} "
                    f"| {wpeak['ours']:.0f} |")
        rows.append(f"| torchvision ImageFolder + DataLoader | {med['torchvision']:.0f} | {peak['torchvision']:.0f} "
                    f"| {wpeak['torchvision']:.0f} |")
        sections.append(
            f"### {count:,} images (32x32 PNG, generated in {made:.0f} s or reused)\n\n" + "\n".join(rows) +
            f"\n\nours / torchvision = **{ratio:.2f}x** over {args.epochs} epochs, {rounds} round(s) "
            f"(per round: {', '.join(f'{x:.2f}' for x in per_round)}); ours spent {decode:.1f} s of its time "
            f"decoding (the first epoch).\n")
        verdicts.append(Verdict(f"training input throughput, {count:,} images, {args.workers} workers",
                                ">= 1.0x torchvision ImageFolder + DataLoader", f"{ratio:.2f}x", ratio >= 1.0))
        if count == max(args.counts):
            verdicts.append(Verdict(f"peak RSS at {count:,} images (ours, the training process that holds the data)",
                                    f"< memory budget {budget:.0f} MB", f"{peak['ours']:.0f} MB",
                                    peak["ours"] < budget))
    facts = machine(load_before)
    text = ("# Training input: decode once vs ImageFolder + DataLoader\n\n"
            f"Command: `{command_line('data.py')}`\n\n{facts.line()}\n\n"
            f"Workers {args.workers}, batch {args.batch}, the `tiny` model's transform (32 px) on both sides, "
            f"torch threads 1. Worker RSS counts the pages they share with the main process (fork), so the "
            f"two columns do not add up. The machine was shared with other jobs while this ran (load above); the ratio "
            f"comes from runs interleaved in one session. Total {time.time() - start:.0f} s.\n\n"
            + "\n".join(sections))
    print(text)
    write_results("data", text, verdicts, facts, command_line("data.py"))


if __name__ == "__main__":
    main()
