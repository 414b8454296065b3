"""Encoder throughput: ours vs open_clip, video attention modes vs torchvision 3-D CNNs,
and the cost of dynamic head gating.

    .venv/bin/python bench/encoders.py                    # every section (long on 2 cores)
    .venv/bin/python bench/encoders.py --sections image   # the open_clip parity goal only
    .venv/bin/python bench/encoders.py --quick            # batches 1 and 8, fewer video / gating rounds

Everything runs in one process, fp32, ``torch.set_num_threads(2)``, random weights
(nothing downloaded). Contenders are timed in interleaved rounds (each round runs
every contender once, in rotating order; at least 5 rounds for the image goal) and the
median per-round time is reported. The image goal: ``ImageEncoder.encode`` (the pooled
embedding, open_clip's ``encode_image`` equivalent) >= 1.0x open_clip ``encode_image``
at every batch size. Figures go to ``bench/results/encoders.md`` and ``encoders.json``
(verdicts computed here, through ``bench/_report.py``).
"""
from __future__ import annotations

import argparse
import os
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

sys.path.append(str(ROOT / "bench"))  # after the root: `encoders` is the package, `_report` the helper

from _report import Verdict, command_line, machine, write_results  # noqa: E402
from encoders import ImageEncoder  # noqa: E402
from encoders.convert import image_encoder_from_open_clip, video_encoder_from_image_encoder  # noqa: E402

PARITY_GOAL = 1.0
SECTIONS = ("image", "video", "gating")


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


def bench_image(batches: list[int], rounds: int) -> tuple[list[str], list[Verdict], ImageEncoder]:
    """ours (``encode``, pooled only; and ``forward``, every token) vs open_clip ``encode_image``."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32").eval()
    ours = image_encoder_from_open_clip(clip).eval()
    lines = [
        "## Image: `image_encoder_from_open_clip(ViT-B-32)` vs open_clip `encode_image`",
        "",
        f"{rounds} interleaved rounds in rotated order, medians. `ours encode` is `ImageEncoder.encode` (the "
        "pooled embedding, what `encode_image` returns; the last block runs its output projection and MLP for "
        "the class token only); `ours forward` returns every token as well (context, no goal).",
        "",
        "| batch | open_clip img/s | ours encode img/s | ratio encode/open_clip | ours forward img/s | "
        "ratio forward/open_clip | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for b in batches:
        load_start = os.getloadavg()[0]
        x = torch.randn(b, 3, 224, 224)
        with torch.inference_mode():
            expected = clip.encode_image(x)
            diff = max((ours.encode(x) - expected).abs().max().item(), (ours(x).pooled - expected).abs().max().item())
        t = interleaved({"open_clip": lambda: clip.encode_image(x), "encode": lambda: ours.encode(x),
                         "forward": lambda: ours(x)}, rounds, f"image b={b}")
        ratio, ratio_fwd = t["open_clip"] / t["encode"], t["open_clip"] / t["forward"]
        lines.append(f"| {b} | {b / t['open_clip']:.2f} | {b / t['encode']:.2f} | **{ratio:.2f}** | "
                     f"{b / t['forward']:.2f} | {ratio_fwd:.2f} | {diff:.1e} |")
        print(lines[-1], flush=True)
        loads = (load_start, os.getloadavg()[0])
        verdicts.append(Verdict(f"ViT-B-32 fp32 image embedding, batch {b}: ours / open_clip encode_image "
                                f"(max abs diff {diff:.1e})", f">= {PARITY_GOAL}x",
                                f"{ratio:.2f}x (load {min(loads):.1f}-{max(loads):.1f})",
                                ratio >= PARITY_GOAL and diff <= 1e-4, "18.4"))
    return lines, verdicts, ours


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
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8; fewer video and gating rounds")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--rounds", type=int, default=5, help="image rounds (at least 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error(f"--rounds must be at least 5, got {args.rounds}")
    torch.set_num_threads(args.threads)
    rounds = args.rounds
    if args.quick:
        batches, video_rounds, gate_rounds, topks, gate_batches = [1, 8], 1, 3, [6], [1]
    else:
        batches, video_rounds, gate_rounds, topks, gate_batches = [1, 8, 32], 3, 5, [6, 3], [1, 8]
    load_before = os.getloadavg()[0]
    started = time.time()
    image_lines, verdicts, ours = bench_image(batches, rounds) if "image" in args.sections else ([], [], None)
    if ours is None and set(args.sections) & {"video", "gating"}:
        import open_clip

        torch.manual_seed(0)
        ours = image_encoder_from_open_clip(open_clip.create_model("ViT-B-32").eval()).eval()
    video_lines = bench_video(ours, frames=8, size=224, rounds=video_rounds) if "video" in args.sections else []
    gating_lines = bench_gating(ours, gate_batches, topks, gate_rounds) if "gating" in args.sections else []
    facts = machine(load_before)
    header = [
        "# Encoder benchmarks",
        "",
        f"Command: `{command_line('encoders.py')}`",
        "",
        facts.line(),
        "",
        f"fp32, {args.threads} threads, random weights; median of interleaved rounds in rotated order (image "
        f"{rounds}, video {video_rounds}, gating {gate_rounds}). The machine may be shared with other jobs (see the "
        f"load above): absolute figures are noisy, the ratios are measured side by side. Total "
        f"{time.time() - started:.0f} s. Sections run: {', '.join(args.sections)}.",
        "",
    ]
    if verdicts:
        header += ["| goal | measured | met |", "|---|---:|---|"]
        header += [f"| {v.what} {v.goal} | {v.measured} | {'yes' if v.met else 'no'} |" for v in verdicts] + [""]
    text = "\n".join(header + image_lines + video_lines + gating_lines)
    print("wrote", write_results("encoders", text, verdicts, facts, command_line("encoders.py"), args.results_dir))


if __name__ == "__main__":
    main()
