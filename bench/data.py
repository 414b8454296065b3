"""Training input throughput: ours (decode once into uint8, then index) against torchvision ImageFolder + DataLoader.

For each set size (default 20,000 and 200,000 images of 32x32 PNG in 100 class folders, generated
once into ``.cache/bench_data/``): images/s delivered to the model as normalised float batches
(B,3,32,32) over ``--epochs`` shuffled epochs, decoding included, with the same worker count,
batch size and the model's own transform on both sides:

- ours: ``ernie_vl.data.sources.CachedPairs`` (workers decode each image to uint8 straight into
  its row of one shared array; every batch is then one index + one fused multiply-add). Its
  time includes reading the CSV and tokenising the captions, which the anchor does not do;
- anchor: ``torchvision.datasets.ImageFolder`` + ``DataLoader(shuffle=True)``, the plain pipeline that
  decodes every image every epoch (its best settings: persistent workers, pinned off on CPU,
  prefetch 2).

Each method runs in its own subprocess (so its peak RSS, and its workers', are its own), in
``--rounds`` rounds that alternate who goes first. Ours always runs its whole ``--epochs``.
The anchor's epochs all cost the same (it decodes every image every time), so above
``--full-anchor-max`` images it runs ONE epoch per round and its ``--epochs`` time is that
epoch plus ``epochs - 1`` epochs at the steady rate it showed after its first 20 batches
(at the smaller size both are measured, so the estimate is checked against the real run).
Peak RSS is compared with the training memory budget (``TrainConfig.cache_max_mb``) at the
largest size.

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
    """One measurement in this process: per-epoch seconds, decoding (ours) included in the first."""
    import resource

    import torch

    import ernie_vl

    torch.set_num_threads(1)
    model = ernie_vl.create_model("tiny")
    pre = model.preprocess
    t0 = time.perf_counter()
    delivered, checksum, epoch_s, warm = 0, 0.0, [], None
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
            epoch_s.append(time.perf_counter() - t0 - sum(epoch_s))
    else:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        data = ImageFolder(str(root), transform=pre)
        loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
        decode_s = 0.0
        for _ in range(epochs):
            for i, (images, _) in enumerate(loader):
                delivered += len(images)
                checksum += float(images[0, 0, 0, 0])
                if i == 20 and warm is None:  # workers running: the steady rate starts here
                    warm = (time.perf_counter(), delivered)
            epoch_s.append(time.perf_counter() - t0 - sum(epoch_s))
            if len(epoch_s) == 1:
                steady = (delivered - warm[1]) / (time.perf_counter() - warm[0])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    per_epoch = delivered // epochs
    out = {"method": method, "images_per_s": delivered / seconds, "seconds": seconds, "decode_s": decode_s,
           "epoch_s": epoch_s, "per_epoch": per_epoch, "delivered": delivered, "peak_rss_mb": peak,
           "worker_peak_rss_mb": worker_peak, "checksum": checksum}
    if method != "ours":
        out["steady_images_per_s"] = steady
    return out


def measure(method: str, root: Path, args: argparse.Namespace, epochs: int) -> dict:
    cmd = [sys.executable, __file__, "--one", method, "--root", str(root), "--workers", str(args.workers),
           "--batch", str(args.batch), "--epochs", str(epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def anchor_seconds(r: dict, epochs: int) -> float:
    """The anchor's time for ``epochs`` epochs: its first epoch, then the rest at its steady rate."""
    return r["epoch_s"][0] + (epochs - 1) * r["per_epoch"] / r["steady_images_per_s"]


def size_section(count: int, made: float, args: argparse.Namespace, budget: float) -> tuple[str, list]:
    """Rounds at one size: the markdown section and its verdicts."""
    import statistics

    from ernie_vl.data.sources import estimate_bytes

    root = CACHE / f"png32-{count}"
    full = count <= args.full_anchor_max
    load0 = os.getloadavg()[0]
    results: dict[str, list[dict]] = {"ours": [], "torchvision": []}
    for r in range(args.rounds):
        order = ("ours", "torchvision") if r % 2 == 0 else ("torchvision", "ours")
        for method in order:
            epochs = args.epochs if method == "ours" or full else 1
            results[method].append(measure(method, root, args, epochs))
            print(count, r, method, [round(x, 1) for x in results[method][-1]["epoch_s"]], flush=True)
    load1 = os.getloadavg()[0]
    ours, tv = results["ours"], results["torchvision"]
    n = ours[0]["per_epoch"]
    ours_total = [x["seconds"] for x in ours]
    tv_est = [anchor_seconds(x, args.epochs) for x in tv]
    per_round = [(args.epochs * n / o) / (args.epochs * x["per_epoch"] / a) for o, a, x in zip(ours_total, tv_est, tv)]
    ratio = statistics.median(per_round)
    med = statistics.median
    first = med(a["epoch_s"][0] for a in tv) / med(o["epoch_s"][0] for o in ours)
    later = med(anchor_seconds(a, 2) - a["epoch_s"][0] for a in tv) / med(o["epoch_s"][1] for o in ours) \
        if args.epochs > 1 else float("nan")
    peak = {m: max(x["peak_rss_mb"] for x in v) for m, v in results.items()}
    wpeak = {m: max(x["worker_peak_rss_mb"] for x in v) for m, v in results.items()}
    rows = ["| what | ours | torchvision | ours / torchvision (speed) |", "|---|---:|---:|---:|",
            f"| first epoch, s (ours: CSV, decode to the cache, tokenise, one pass) "
            f"| {med(o['epoch_s'][0] for o in ours):.1f} | {med(a['epoch_s'][0] for a in tv):.1f} | {first:.2f}x |",
            f"| one later epoch, s (ours: index the cache; anchor: decode again, steady rate) "
            f"| {med(o['epoch_s'][1] for o in ours) if args.epochs > 1 else float('nan'):.2f} "
            f"| {med(anchor_seconds(a, 2) - a['epoch_s'][0] for a in tv):.2f} | {later:.1f}x |",
            f"| **{args.epochs} epochs, images/s** | {med(args.epochs * n / o for o in ours_total):.0f} "
            f"| {med(args.epochs * x['per_epoch'] / a for a, x in zip(tv_est, tv)):.0f} | **{ratio:.2f}x** |",
            f"| peak RSS MB, main process | {peak['ours']:.0f} | {peak['torchvision']:.0f} | |",
            f"| peak RSS MB, largest worker | {wpeak['ours']:.0f} | {wpeak['torchvision']:.0f} | |"]
    how = (f"the anchor ran all {args.epochs} epochs" if full else
           f"the anchor ran 1 epoch per round; its {args.epochs}-epoch time is that epoch + "
           f"{args.epochs - 1} at its steady rate")
    check = ""
    if full and args.epochs > 1:
        real = med(x["seconds"] for x in tv)
        check = (f" Check of the anchor's estimate at this size: {med(tv_est):.1f} s estimated from its first "
                 f"epoch vs {real:.1f} s measured over {args.epochs} epochs.")
    mb = estimate_bytes(count, 1, 32) / 2**20
    text = (f"### {count:,} images (32x32 PNG, generated in {made:.0f} s or reused)\n\n" + "\n".join(rows) +
            f"\n\n{args.rounds} rounds in alternating order, medians; {how}. Per round ({args.epochs} epochs): "
            f"{', '.join(f'{x:.2f}' for x in per_round)}.{check} Decoded size {mb:.0f} MB, under the "
            f"{budget:.0f} MB budget, so `ernie-vl train` caches this set too (it streams only above the budget). "
            f"1-min load average {load0:.1f} before, {load1:.1f} after this size.\n")
    verdicts = [Verdict(f"training input throughput, {count:,} images, {args.workers} workers, {args.epochs} epochs",
                        ">= 1.0x torchvision ImageFolder + DataLoader", f"{ratio:.2f}x", ratio >= 1.0)]
    if count == max(args.counts):
        verdicts.append(Verdict(f"peak RSS at {count:,} images (ours, the training process that holds the data)",
                                f"< memory budget {budget:.0f} MB", f"{peak['ours']:.0f} MB", peak["ours"] < budget))
    return text, verdicts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (training reads data many times)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per size, alternating who goes first")
    p.add_argument("--full-anchor-max", type=int, default=50000,
                   help="largest size at which the anchor runs every epoch (above: one, then its steady rate)")
    p.add_argument("--one", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.root, args.workers, args.batch, args.epochs)))
        return

    from ernie_vl.train.config import TrainConfig

    budget = TrainConfig.__dataclass_fields__["cache_max_mb"].default
    load_before = os.getloadavg()[0]
    start = time.time()
    sections, verdicts = [], []
    for count in args.counts:
        t = time.time()
        make_images(CACHE / f"png32-{count}", count)
        text, found = size_section(count, time.time() - t, args, budget)
        sections.append(text)
        verdicts += found
    facts = machine(load_before)
    text = ("# Training input: decode once vs ImageFolder + DataLoader\n\n"
            f"Command: `{command_line('data.py')}`\n\n{facts.line()}\n\n"
            f"Workers {args.workers}, batch {args.batch}, the `tiny` model's transform (32 px) on both sides, "
            f"torch threads 1. Worker RSS counts the pages they share with the main process (fork), so the "
            f"two columns do not add up; ours' main-process RSS includes the decoded rows (shared memory the "
            f"workers wrote, counted once the epochs read them). Ratios come from runs interleaved in one "
            f"session; the load average is recorded above and per size. Total {time.time() - start:.0f} s.\n\n"
            + "\n".join(sections))
    print(text)
    write_results("data", text, verdicts, facts, command_line("data.py"))


if __name__ == "__main__":
    main()
