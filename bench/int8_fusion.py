"""Each fused quantize step of the int8 transformer block, timed against the path it replaces, in one process.

Rows (interleaved rounds in rotated order, each variant's fastest round; 2 threads; random weights, no download):
- ``residual add in the GEMM``: the int8 ViT-B/32 image trunk (``from_open_clip`` + ``quantize_int8``) with
  ``Int8Block.fuse_residual`` on (out-proj and fc2 add the residual inside oneDNN's GEMM) against off
  (a separate add after each GEMM), at each batch size. The verdict checks that the shipped default is the
  faster one (fused only when it is not slower at any batch size).
- ``8-bit activations``: the same trunk quantized with 8-bit activations against 7-bit ones: time and the
  cosine of the pooled output to fp32 (the grid is a property of the engine on this CPU; this row shows
  what the 8-bit grid costs and gives); and the whole path (8-bit, fused adds) against the previous one
  (7-bit, separate adds).
- ``GELU in fc1's GEMM``: oneDNN's GELU post-op against the GEMM followed by ``F.gelu`` (400 x 768 -> 3072,
  a ViT-B/32 fc1 at batch 8). Kept when faster.
- ``one-op quantize``: ``torch.quantize_per_tensor_dynamic`` (min/max and quantize in one call) against the
  path in use (``aminmax`` then ``quantize_per_tensor``) on the fc2 input (400 x 3072), the GELU output.
  Adopted only when faster.
Requantizing a GEMM's output straight to u8 (oneDNN's output scale) needs that scale before the GEMM runs:
with dynamic (per call) activation ranges there is none, so it is not a row here.

    .venv/bin/python bench/int8_fusion.py [--rounds 7] [--batches 8 32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))

from _report import Verdict, command_line, machine, write_results  # noqa: E402


#: per-variant statistic the ratios use: the fastest of the rounds (the least disturbed by other jobs on a
#: shared machine; every variant is deterministic compute, so the spread above it is interference)
STAT = min
MEDIANS: dict[str, float] = {}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """``STAT`` of the seconds per call of each function (medians kept in ``MEDIANS``): one warm-up each,
    then ``rounds`` rotated rounds."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - start)
    MEDIANS.update({n: statistics.median(v) for n, v in times.items()})
    return {n: STAT(v) for n, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (at least 5)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error(f"--rounds must be at least 5, got {args.rounds}")
    load_before = os.getloadavg()[0]
    torch.set_num_threads(2)
    torch.manual_seed(0)

    import open_clip

    import ernie_vl
    from ernie_vl.int8_engines import (ACT_QMAX_7BIT, ACT_QMAX_8BIT, available_int8_kernels, prepack,
                                       quantize_activation)
    from ernie_vl.quantize import Int8Block, int8_kernel

    clip = open_clip.create_model("ViT-B-32").eval()
    model = ernie_vl.from_open_clip(clip, num_experts=8, top_k=2)
    q8 = ernie_vl.quantize_int8(model, activation_bits=8).image_encoder
    q7 = ernie_vl.quantize_int8(model, activation_bits=7).image_encoder
    shipped = Int8Block.fuse_residual

    def trunk(encoder, fuse: bool, x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            Int8Block.fuse_residual = fuse
            return encoder.encode(x)
        return run

    trunks: dict[int, dict[str, float]] = {}
    cos: dict[int, dict[int, float]] = {}  # batch -> bits -> min cosine of the pooled output to fp32
    engines: dict[tuple[int, int, int], str] = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            ref = model.image_encoder.encode(x)
            cos[batch] = {bits: F.cosine_similarity(enc.encode(x), ref).min().item()
                          for bits, enc in ((8, q8), (7, q7))}
        trunks[batch] = interleaved({"8-bit, fused adds": trunk(q8, True, x), "8-bit, separate adds": trunk(q8, False, x),
                                     "7-bit, fused adds": trunk(q7, True, x),
                                     "7-bit, separate adds (the previous path)": trunk(q7, False, x)}, args.rounds)
        rows = batch * 50
        engines.update({(rows, k, n): int8_kernel(rows, k, n, a) for k, n, a in
                        ((768, 2304, None), (768, 768, None), (768, 3072, "gelu"), (3072, 768, None))})
    Int8Block.fuse_residual = shipped

    # op level at the first batch size: fc1's GELU, the GELU output's quantization
    rows = args.batches[0] * 50
    g = torch.Generator().manual_seed(0)
    h_in = torch.randn(rows, 768, generator=g)
    gelu_out = F.gelu(torch.randn(rows, 3072, generator=g) * 2)
    op_rows: dict[str, dict[str, float]] = {}
    if "onednn" in available_int8_kernels():
        w, scale, zp, bias = prepack(torch.randint(-127, 128, (3072, 768), dtype=torch.int8, generator=g),
                                     torch.full((3072,), 1e-3), torch.zeros(3072), "onednn")
        qx, xs, xz = quantize_activation(h_in, ACT_QMAX_8BIT)

        def gemm(post: str) -> Callable[[], object]:
            def run() -> object:
                y = torch.ops.onednn.qlinear_pointwise(qx, xs, xz, w, scale, zp, bias, 1.0, 0, torch.float32,
                                                       post, [], "none" if post == "gelu" else "")
                return y if post == "gelu" else F.gelu(y)
            return run
        op_rows["gelu"] = interleaved({"fused": gemm("gelu"), "separate": gemm("none")}, args.rounds * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op_rows["quantize"] = interleaved({
            "aminmax + quantize_per_tensor": lambda: quantize_activation(gelu_out, ACT_QMAX_7BIT),
            "quantize_per_tensor_dynamic": lambda: torch.quantize_per_tensor_dynamic(gelu_out, torch.quint8, True)},
            args.rounds * 3)
    load_after = os.getloadavg()[0]

    facts = machine(load_before)
    load = f" (load {min(load_before, load_after):.1f}-{max(load_before, load_after):.1f})"
    verdicts = []
    gains = {b: t["8-bit, separate adds"] / t["8-bit, fused adds"] for b, t in trunks.items()}
    faster = all(gain >= 1.0 for gain in gains.values())  # fused only if it is not slower at any batch size
    verdicts.append(Verdict("int8 ViT-B/32 trunk: residual adds inside the out-proj and fc2 GEMMs / separate adds, "
                            f"batch {', '.join(map(str, gains))}; shipped default `Int8Block.fuse_residual = "
                            f"{shipped}`", "the default is the faster",
                            " / ".join(f"{g:.3f}x" for g in gains.values()) + load, shipped == faster, "-"))
    path = "8-bit, fused adds" if shipped else "8-bit, separate adds"
    for b, t in trunks.items():
        verdicts.append(Verdict(f"int8 ViT-B/32 trunk, batch {b}: 8-bit / 7-bit activations, speed (cosine to fp32 "
                                f"{cos[b][8]:.4f} vs {cos[b][7]:.4f})", "report",
                                f"{t['7-bit, separate adds (the previous path)'] / t['8-bit, separate adds']:.3f}x"
                                + load, None, "-"))
        prev = t["7-bit, separate adds (the previous path)"]
        verdicts.append(Verdict(f"int8 ViT-B/32 trunk, batch {b}: the shipped path ({path}) / the previous one "
                                f"(7-bit, separate adds)", "report", f"{prev / t[path]:.3f}x" + load, None, "11"))
    if "gelu" in op_rows:
        r = op_rows["gelu"]["separate"] / op_rows["gelu"]["fused"]
        verdicts.append(Verdict(f"fc1 {rows}x768->3072 on oneDNN: GELU as the GEMM's post-op (shipped) / F.gelu "
                                "after it", ">= 1.0x", f"{r:.2f}x" + load, r >= 1.0, "-"))
    r = op_rows["quantize"]["aminmax + quantize_per_tensor"] / op_rows["quantize"]["quantize_per_tensor_dynamic"]
    verdicts.append(Verdict(f"GELU output {rows}x3072: one-op quantize_per_tensor_dynamic / aminmax + "
                            "quantize_per_tensor (shipped); adopted only when faster", "report",
                            f"{r:.2f}x ({'adopt' if r > 1.0 else 'dropped'})" + load, None, "-"))
    lines = [
        "# Fused quantize steps of the int8 transformer block, each against the path it replaces",
        "",
        f"Command: `{command_line('int8_fusion.py')}`",
        "",
        facts.line(),
        "",
        (f"`torch.set_num_threads(2)`; {args.rounds} interleaved rounds in rotated order for the trunk, "
         f"{args.rounds * 3} for the single ops (batch {args.batches[0]}), one process; ratios of each variant's "
         "fastest round (the least disturbed: on a shared machine the spread above it is other jobs). Which parts are int8: patch embedding, "
         "q/k/v (one packed GEMM, its input quantized once for all three), output projection, fc1 (GELU fused on "
         "oneDNN), fc2. Float32: LayerNorms, Q.K^T, softmax, P.V (SDPA), residual adds (unless fused)."),
        "",
        "| goal | measured | met |",
        "|---|---:|---|",
    ]
    lines += [f"| {v.what} {v.goal} | {v.measured} | {'-' if v.met is None else 'yes' if v.met else 'no'} |"
              for v in verdicts]
    lines += ["", "- int8 engines chosen for the trunk's GEMMs (rows, in, out): "
              + ", ".join(f"{k}: {e}" for k, e in engines.items()), "",
              "| what | variant | ms per call, fastest round | median |", "|---|---|---:|---:|"]
    for b, t in trunks.items():
        lines += [f"| trunk batch {b} | {name} | {s * 1e3:.1f} | - |" for name, s in t.items()]
    for what, row in op_rows.items():
        lines += [f"| {what} | {name} | {s * 1e3:.3f} | {MEDIANS[name] * 1e3:.3f} |" for name, s in row.items()]
    print("\n".join(lines))
    print("wrote", write_results("int8_fusion", "\n".join(lines), verdicts, facts, command_line("int8_fusion.py"),
                                 args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
