"""Encoder throughput: ours vs open_clip, video attention modes vs torchvision 3-D CNNs,
and the cost of dynamic head gating.

    .venv/bin/python bench/encoders.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/encoders.py --quick    # about a minute

Everything runs in one process, fp32, ``torch.set_num_threads(2)``, random weights
(nothing downloaded). Contenders are timed in interleaved rounds (each round runs
every contender once, in rotating order) and the median per-round time is reported.
Figures go to ``bench/results/encoders.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the `encoders` package: keep bench/ off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from encoders import ImageEncoder  # noqa: E402
from encoders.convert import image_encoder_from_open_clip, video_encoder_from_image_encoder  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "encoders.md"


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, desc: str) -> dict[str, float]:
    """Median seconds per call of each contender over ``rounds`` interleaved rounds (1 warm-up)."""
    from tqdm import tqdm

    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()
        for r in tqdm(range(rounds), desc=desc, leave=False, file=sys.stderr):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                start = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def bench_image(batches: list[int], rounds: int) -> list[str]:
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32").eval()
    ours = image_encoder_from_open_clip(clip).eval()
    lines = [
        "## Image: `image_encoder_from_open_clip(ViT-B-32)` vs open_clip `encode_image`",
        "",
        "| batch | open_clip img/s | ours img/s | ratio ours/open_clip | max abs diff |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        with torch.inference_mode():
            diff = (ours(x).pooled - clip.encode_image(x)).abs().max().item()
        t = interleaved({"open_clip": lambda: clip.encode_image(x), "ours": lambda: ours(x)}, rounds, f"image b={b}")
        ratio = t["open_clip"] / t["ours"]
        lines.append(f"| {b} | {b / t['open_clip']:.2f} | {b / t['ours']:.2f} | **{ratio:.2f}** | {diff:.1e} |")
        print(lines[-1], flush=True)
    return lines, ours


def bench_video(image_encoder: ImageEncoder, frames: int, size: int, rounds: int) -> list[str]:
    from torchvision.models.video import r2plus1d_18, r3d_18

    torch.manual_seed(0)
    clips = torch.randn(1, frames, 3, size, size)
    contenders: dict[str, Callable[[], object]] = {}
    for mode in ("divided", "joint", "space_only"):
        enc = video_encoder_from_image_encoder(image_encoder, frames, attention=mode, cls_mode="shared").eval()
        contenders[f"ours {mode}"] = lambda enc=enc: enc(clips)
    cnn_input = clips.permute(0, 2, 1, 3, 4).contiguous()  # (B, 3, T, H, W)
    for name, ctor in (("r3d_18", r3d_18), ("r2plus1d_18", r2plus1d_18)):
        net = ctor(weights=None).eval()
        contenders[f"torchvision {name}"] = lambda net=net: net(cnn_input)
    t = interleaved(contenders, rounds, "video")
    base = t["torchvision r3d_18"]
    lines = [
        "",
        f"## Video: 1 clip of {frames}x{size}x{size}, ViT-B/32 trunk (the open_clip ViT-B-32 weights, inflated)",
        "",
        "| model | clips/s | s/clip | speed vs r3d_18 |",
        "|---|---:|---:|---:|",
    ]
    for name, sec in t.items():
        lines.append(f"| {name} | {1 / sec:.2f} | {sec:.3f} | {base / sec:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def bench_gating(image_encoder: ImageEncoder, batches: list[int], topks: list[int], rounds: int) -> list[str]:
    torch.manual_seed(0)
    cfg = image_encoder.cfg
    gated = {}
    for k in topks:
        enc = ImageEncoder(replace(cfg, head_gating=True, head_topk=k)).eval()
        enc.load_state_dict(image_encoder.state_dict(), strict=False)
        with torch.no_grad():  # give the (zero-initialised) gates some input dependence
            for block in enc.blocks:
                block.gate.proj.weight.normal_(0, 0.05)
        gated[k] = enc
    lines = [
        "",
        f"## Dynamic head gating: ViT-B/32 ({cfg.num_heads} heads per layer), gates with random weights",
        "",
        "Active = share of heads each sample keeps; computed = share of heads that at least one",
        "sample of the batch keeps (only those are computed; the rest of the block is unchanged).",
        "",
        "| batch | variant | active-head ratio | computed-head ratio | img/s | time saved vs gating off |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        contenders: dict[str, Callable[[], object]] = {"gating off": lambda: image_encoder(x)}
        ratios = {}
        for k, enc in gated.items():
            computed: list[float] = []
            hooks = [blk.gate.register_forward_hook(
                lambda _m, _i, out: computed.append(out.keep.any(0).float().mean().item())) for blk in enc.blocks]
            with torch.inference_mode():
                active = enc(x).active_head_ratio.mean().item()
            for hook in hooks:
                hook.remove()
            ratios[k] = (active, sum(computed) / len(computed))
            contenders[f"head_topk={k}"] = lambda enc=enc: enc(x)
        t = interleaved(contenders, rounds, f"gating b={b}")
        base = t["gating off"]
        lines.append(f"| {b} | gating off | 1.00 | 1.00 | {b / base:.2f} | 0% |")
        for k in topks:
            sec = t[f"head_topk={k}"]
            active, computed = ratios[k]
            lines.append(
                f"| {b} | head_topk={k} | {active:.2f} | {computed:.2f} | {b / sec:.2f} | {100 * (1 - sec / base):.0f}% |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds (about a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        batches, rounds, video_rounds, gate_rounds, topks, gate_batches = [1, 8], 3, 1, 3, [6], [1]
    else:
        batches, rounds, video_rounds, gate_rounds, topks, gate_batches = [1, 8, 32], 5, 3, 5, [6, 3], [1, 8]
    load_before = os.getloadavg()[0]
    started = time.time()
    image_lines, ours = bench_image(batches, rounds)
    video_lines = bench_video(ours, frames=8, size=224, rounds=video_rounds)
    gating_lines = bench_gating(ours, gate_batches, topks, gate_rounds)
    load_after = os.getloadavg()[0]
    command = ".venv/bin/python bench/encoders.py" + (" --quick" if args.quick else "")
    header = [
        "# Encoder benchmarks",
        "",
        f"Command: `{command}`",
        "",
        f"fp32, {args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs. Median of interleaved rounds (image {rounds}, video {video_rounds}, gating "
        f"{gate_rounds}); random weights. **The machine was shared with other jobs while this ran** "
        f"(1-min load average {load_before:.1f} before, {load_after:.1f} after), so absolute figures are noisy; "
        f"the ratios are measured side by side. Total {time.time() - started:.0f} s.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + image_lines + video_lines + gating_lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
