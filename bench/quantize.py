"""int8 image path of ErnieVL (from open_clip ViT-B-32) against open_clip's fp32 ``encode_image``.

Same process, 2 threads, interleaved rounds, medians (wall clock, and process CPU time as a
second, less load-sensitive ratio on this shared machine). Variants (all random init, no download):
- ``open_clip fp32``: ``clip.encode_image`` (the anchor);
- ``ernie fp32, gates closed``: ``from_open_clip(clip, 8 experts, top-2).encode_image`` as built:
  ViT-B/32 trunk, linear projector, 12-layer MoE backbone whose visual residual gates are all 0;
- ``ernie int8, gates closed``: the same after ``quantize_int8``. Both closed-gate rows use the
  exact closed-gate shortcut (``BackboneBlock``: a block whose gate is 0 for every token leaves
  them unchanged, so only its router runs), which is what a from_open_clip model at init gives;
- ``ernie int8, gates open``: the same int8 model with every visual gate set to 1.0, i.e. the
  compute of a model whose training opened the gates: all 50 tokens of every image through the
  12 attention + MoE blocks (the image path a user of a fine-tuned model gets);
- ``ernie int8, gates open, cls-only``: gates open with ``image_projector.tokens = "prefix"``
  (only the class token enters the backbone; a config choice, see ``ProjectorConfig``);
- ``int8 trunk alone`` (diagnostic, not an image path): ``qmodel.image_encoder`` only.
Also prints the size ratio (safetensors bytes) and the cosine similarity of int8 against fp32
embeddings on random inputs (gates closed and open).

    .venv/bin/python bench/quantize.py [--quick] [--batches 8 32] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR = "open_clip fp32"


def timed(fn: Callable, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call under inference mode."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - wall, time.process_time() - cpu


@contextmanager
def visual_gates(model, value: float | None, tokens: str | None = None):
    """Temporarily set every backbone block's image/video gate to ``value`` (None: unchanged)
    and ``image_projector.tokens`` to ``tokens`` (None: unchanged)."""
    saved = [block.gate.detach().clone() for block in model.backbone.blocks]
    saved_tokens = model.cfg.image_projector.tokens
    try:
        with torch.no_grad():
            for block in model.backbone.blocks:
                if value is not None:
                    block.gate[1:] = value
        if tokens is not None:
            model.cfg.image_projector.tokens = tokens
        yield model
    finally:
        with torch.no_grad():
            for block, gate in zip(model.backbone.blocks, saved):
                block.gate.copy_(gate)
        model.cfg.image_projector.tokens = saved_tokens


def with_gates(model, value: float | None, tokens: str | None = None) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with visual_gates(model, value, tokens):
            return model.encode_image(x)
    return run


def gemm_ceiling(rows: int, rounds: int) -> dict[str, float]:
    """fp32 time over int8 time, summed over the four GEMM shapes of a ViT-B/32 block (qkv, proj,
    fc1, fc2) at ``rows`` tokens, per int8 kernel: the speed-up int8 can give the trunk's GEMMs."""
    from torch import nn

    from ernie_vl.quantize import Int8Linear, available_int8_kernels, set_int8_kernel

    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    layers = [(torch.randn(rows, k), nn.Linear(k, n)) for k, n in shapes]
    int8 = [Int8Linear.from_linear(linear) for _, linear in layers]
    totals: dict[str, list[float]] = {name: [] for name in ("fp32",) + available_int8_kernels()}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for name in totals:
                previous = set_int8_kernel(name) if name != "fp32" else None
                start = time.perf_counter()
                for (x, linear), q in zip(layers, int8):
                    linear(x) if name == "fp32" else q(x)
                totals[name].append(time.perf_counter() - start)
                if previous is not None:
                    set_int8_kernel(previous)
    fp32 = statistics.median(totals["fp32"][1:])
    return {name: fp32 / statistics.median(ts[1:]) for name, ts in totals.items() if name != "fp32"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8 only, 2 rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.md"))
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds = [8], 2
    torch.set_num_threads(2)
    torch.manual_seed(0)

    import open_clip
    from tqdm import tqdm

    import ernie_vl
    from ernie_vl.quantize import available_int8_kernels, int8_kernel, state_dict_bytes

    try:
        import torchao  # noqa: F401
        torchao_note = f"torchao {torchao.__version__} installed (not used)"
    except ImportError:
        torchao_note = "torchao not installed"

    clip = open_clip.create_model("ViT-B-32").eval()
    model = ernie_vl.from_open_clip(clip, num_experts=8, top_k=2)
    qmodel = ernie_vl.quantize_int8(model)
    kernel = int8_kernel()

    variants = {
        ANCHOR: clip.encode_image,
        "ernie fp32, gates closed": model.encode_image,
        "ernie int8, gates closed": qmodel.encode_image,
        "ernie int8, gates open": with_gates(qmodel, 1.0),
        "ernie int8, gates open, cls-only": with_gates(qmodel, 1.0, "prefix"),
        "int8 trunk alone (diagnostic)": qmodel.image_encoder,
    }

    # accuracy and size
    x = torch.randn(8, 3, 224, 224)
    tokens = model.tokenizer([f"a photo of object number {i}" for i in range(8)])
    clips = torch.randn(1, 4, 3, 224, 224)
    with torch.inference_mode():
        cos = {
            "image (gates closed)": F.cosine_similarity(model.encode_image(x), qmodel.encode_image(x)).min().item(),
            "image (gates open)": F.cosine_similarity(with_gates(model, 1.0)(x), with_gates(qmodel, 1.0)(x)).min().item(),
            "text": F.cosine_similarity(model.encode_text(tokens), qmodel.encode_text(tokens)).min().item(),
            "video": F.cosine_similarity(model.encode_video(clips), qmodel.encode_video(clips)).min().item(),
        }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/fp32")
        qmodel.save_pretrained(f"{tmp}/int8")
        fp32_bytes = (Path(tmp) / "fp32" / "model.safetensors").stat().st_size
        int8_bytes = (Path(tmp) / "int8" / "model.safetensors").stat().st_size
    print(f"int8 kernel {kernel} (available: {', '.join(available_int8_kernels())}); "
          f"quantized engines {torch.backends.quantized.supported_engines}; {torchao_note}")
    print(f"size: fp32 {fp32_bytes / 1e6:.0f} MB, int8 {int8_bytes / 1e6:.0f} MB, ratio {int8_bytes / fp32_bytes:.3f} "
          f"(state dict {state_dict_bytes(qmodel) / state_dict_bytes(model):.3f})")
    print("min cosine int8 vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))

    ceiling = gemm_ceiling(8 * 50, max(args.rounds, 3))
    print("GEMM-only int8 speed-up over fp32 (ViT-B/32 block shapes, 400 rows): "
          + ", ".join(f"{k} x{v:.2f}" for k, v in ceiling.items()))

    results: dict[int, dict[str, tuple[float, float, float]]] = {}
    loads = []
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        for fn in variants.values():  # warm-up (also builds the int8 packed weights)
            timed(fn, x[:2])
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        for _ in tqdm(range(args.rounds), desc=f"batch {batch}"):
            for name, fn in variants.items():
                wall, cpu = timed(fn, x)
                walls[name].append(wall)
                cpus[name].append(cpu)
        loads.append(os.getloadavg()[0])
        base_wall, base_cpu = statistics.median(walls[ANCHOR]), statistics.median(cpus[ANCHOR])
        results[batch] = {
            name: (batch / statistics.median(walls[name]), base_wall / statistics.median(walls[name]),
                   base_cpu / statistics.median(cpus[name]))
            for name in variants
        }
        for name, (ips, ratio, cpu_ratio) in results[batch].items():
            print(f"batch {batch:3d}  {name:34s} {ips:7.2f} images/s  x{ratio:.2f} wall  x{cpu_ratio:.2f} cpu-time "
                  f"vs {ANCHOR}")

    cmd = "  .venv/bin/python bench/quantize.py " + " ".join(sys.argv[1:])
    lines = [
        "# int8 quantization: ErnieVL image path vs open_clip ViT-B-32 fp32",
        "",
        "```",
        cmd.rstrip(),
        "```",
        "",
        f"CPU, `torch.set_num_threads(2)`, torch {torch.__version__}, int8 kernel `{kernel}` "
        f"(available: {', '.join(available_int8_kernels())}; {torchao_note}), {args.rounds} interleaved rounds, "
        f"medians; 1-minute load average after each batch size: "
        f"{', '.join(f'{b}: {load:.1f}' for b, load in zip(args.batches, loads))} on {os.cpu_count()} cores. "
        "The 2-core machine was shared with other jobs while this ran, so absolute figures are low and noisy; "
        "read the ratios (same process, interleaved). `x wall` is the images/s ratio; `x cpu-time` the ratio of "
        "process CPU time per call, less sensitive to waiting for a core.",
        "",
        f"- model size (safetensors): fp32 {fp32_bytes / 1e6:.0f} MB -> int8 {int8_bytes / 1e6:.0f} MB, "
        f"ratio **{int8_bytes / fp32_bytes:.3f}**",
        "- min cosine similarity of int8 vs fp32 embeddings (random inputs): "
        + ", ".join(f"{k} **{v:.4f}**" for k, v in cos.items()),
        "- int8 over fp32 speed-up of the GEMMs alone (the four linear shapes of a ViT-B/32 block, 400 rows = "
        "batch 8; fp32 `F.linear` vs `Int8Linear`): " + ", ".join(f"{k} **{v:.2f}x**" for k, v in ceiling.items())
        + ". The trunk spends over 80% of its int8 time in these GEMMs, so this bounds the image path's speed-up.",
        "",
        "| batch | variant | images/s | x wall vs open_clip fp32 | x cpu-time |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, row in results.items():
        lines += [f"| {batch} | {name} | {ips:.2f} | {ratio:.2f}x | {cpu_ratio:.2f}x |"
                  for name, (ips, ratio, cpu_ratio) in row.items()]
    goal = 2.5
    meets = [name for name in results[args.batches[0]] if name != ANCHOR and "diagnostic" not in name
             and all(results[b][name][1] >= goal for b in results)]
    lines += [
        "",
        f"Goal: >= {goal}x open_clip fp32 images/s (wall) at every batch size measured "
        f"({', '.join(str(b) for b in results)}). Met by: " + (", ".join(f"`{n}`" for n in meets) or "**none**")
        + ". Best image path per batch: "
        + "; ".join(f"{b}: {max((v[1], n) for n, v in row.items() if n != ANCHOR and 'diagnostic' not in n)[0]:.2f}x"
                    for b, row in results.items()) + ".",
    ]
    lines += [
        "",
        "Variants: see the docstring of `bench/quantize.py`. `gates closed` is a from_open_clip model at "
        "initialisation (visual residual gates exactly 0): the exact closed-gate shortcut skips the attention "
        "and experts of every backbone block for the image tokens (`encode_image` skips their routers too: it "
        "returns embeddings only; `forward()` keeps them for exact routing statistics), so this path is the int8 ViT-B/32 trunk plus projector and head. `gates open` sets every "
        "visual gate to 1.0: the compute of a model whose training has opened the gates, all 50 tokens per image "
        "through 12 attention + 8-expert top-2 MoE blocks (about as much compute again as the trunk). "
        "`cls-only` sends only the class token into the backbone (`image_projector.tokens = \"prefix\"`). "
        "`int8 trunk alone` is a diagnostic (the image encoder only, no projector, backbone or head).",
        "",
        "Where the time goes (torch profiler, 1 thread, batch 8, during development): the int8 trunk spends "
        "81-85% of its time in the int8 GEMMs, ~5% in SDPA (faster than an eager attention at 50 tokens), "
        "~3% quantizing activations, the rest in LayerNorm / adds; no fp32 Linear is left (the patch "
        "convolution is an int8 GEMM, GELU is fused into fc1 under oneDNN). The int8 GEMMs run about 2x fp32 "
        "on this AVX2 CPU (no VNNI: u8 x s8 products go through vpmaddubsw + vpmaddwd), which bounds the trunk "
        "near 2x open_clip fp32. oneDNN's kernel was ~15% faster than fbgemm single-threaded but slower at 2 "
        "threads, so `auto` uses it only single-threaded. `gates closed` trails `int8 trunk alone` only by "
        "the projector and head.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
