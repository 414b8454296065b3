"""int8 image path of ErnieVL (from open_clip ViT-B-32) against open_clip's fp32 ``encode_image``.

Same process, 2 threads, interleaved rounds, medians. Variants (all random init, no download):
- ``open_clip fp32``: ``clip.encode_image`` (the anchor);
- ``ernie fp32``: ``from_open_clip(clip, 8 experts, top-2).encode_image`` — ViT-B/32 trunk,
  then the 12-layer MoE backbone (visual gates 0 at init, but every block still runs);
- ``ernie int8``: the same after ``quantize_int8``;
- ``ernie int8 cls-only``: the int8 model configured with ``image_projector.tokens="prefix"``
  (``from_open_clip(..., visual_tokens="prefix")``): only the class token of each image passes
  through the backbone (same embeddings at init; no visual self-attention in the backbone).
Also prints the size ratio (safetensors bytes) and the cosine similarity of int8 against fp32
embeddings on random inputs.

    .venv/bin/python bench/quantize.py [--quick] [--batches 8 32] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - start


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
    from ernie_vl.quantize import state_dict_bytes

    clip = open_clip.create_model("ViT-B-32").eval()
    model = ernie_vl.from_open_clip(clip, num_experts=8, top_k=2)
    qmodel = ernie_vl.quantize_int8(model)

    def prefix_path(x: torch.Tensor) -> torch.Tensor:
        """The int8 model with ``image_projector.tokens="prefix"``: only the class token enters the backbone."""
        qmodel.cfg.image_projector.tokens = "prefix"
        try:
            return qmodel.encode_image(x)
        finally:
            qmodel.cfg.image_projector.tokens = "all"

    variants = {
        "open_clip fp32": clip.encode_image,
        "ernie fp32": model.encode_image,
        "ernie int8": qmodel.encode_image,
        "ernie int8 cls-only": prefix_path,
    }

    # accuracy and size
    x = torch.randn(8, 3, 224, 224)
    tokens = model.tokenizer([f"a photo of object number {i}" for i in range(8)])
    clips = torch.randn(1, 4, 3, 224, 224)
    with torch.inference_mode():
        cos = {
            "image": F.cosine_similarity(model.encode_image(x), qmodel.encode_image(x)).min().item(),
            "text": F.cosine_similarity(model.encode_text(tokens), qmodel.encode_text(tokens)).min().item(),
            "video": F.cosine_similarity(model.encode_video(clips), qmodel.encode_video(clips)).min().item(),
        }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/fp32")
        qmodel.save_pretrained(f"{tmp}/int8")
        fp32_bytes = (Path(tmp) / "fp32" / "model.safetensors").stat().st_size
        int8_bytes = (Path(tmp) / "int8" / "model.safetensors").stat().st_size
    print(f"size: fp32 {fp32_bytes / 1e6:.0f} MB, int8 {int8_bytes / 1e6:.0f} MB, ratio {int8_bytes / fp32_bytes:.3f} "
          f"(state dict {state_dict_bytes(qmodel) / state_dict_bytes(model):.3f})")
    print("min cosine int8 vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items()))

    results: dict[int, dict[str, float]] = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        for fn in variants.values():  # warm-up (also builds the int8 packed weights)
            timed(fn, x[:2])
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in tqdm(range(args.rounds), desc=f"batch {batch}"):
            for name, fn in variants.items():
                times[name].append(timed(fn, x))
        results[batch] = {name: batch / statistics.median(ts) for name, ts in times.items()}
        base = results[batch]["open_clip fp32"]
        for name, ips in results[batch].items():
            print(f"batch {batch:3d}  {name:20s} {ips:7.2f} images/s  x{ips / base:.2f} vs open_clip fp32")

    cmd = "  .venv/bin/python bench/quantize.py " + " ".join(sys.argv[1:])
    lines = [
        "# int8 quantization: ErnieVL image path vs open_clip ViT-B-32 fp32",
        "",
        "```",
        cmd.rstrip(),
        "```",
        "",
        f"CPU, `torch.set_num_threads(2)`, torch {torch.__version__}, {args.rounds} interleaved rounds, medians; "
        f"1-minute load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. "
        "The 2-core machine was shared with other jobs while this ran, so absolute figures are low and noisy; "
        "the ratios (same process, interleaved) are the figures to read.",
        "",
        f"- model size (safetensors): fp32 {fp32_bytes / 1e6:.0f} MB -> int8 {int8_bytes / 1e6:.0f} MB, "
        f"ratio **{int8_bytes / fp32_bytes:.3f}**",
        "- min cosine similarity of int8 vs fp32 embeddings (random inputs): "
        + ", ".join(f"{k} **{v:.4f}**" for k, v in cos.items()),
        "",
        "| batch | variant | images/s | vs open_clip fp32 |",
        "|---:|---|---:|---:|",
    ]
    for batch, row in results.items():
        base = row["open_clip fp32"]
        lines += [f"| {batch} | {name} | {ips:.2f} | {ips / base:.2f}x |" for name, ips in row.items()]
    lines += [
        "",
        "`ernie fp32` / `ernie int8`: the default image path, the ViT-B/32 trunk then all 50 tokens per image "
        "through the 12-layer, 8-expert top-2 MoE backbone (about as much compute again as the trunk: each token "
        "runs 2 experts of 2x512x2048 in every layer). `ernie int8 cls-only`: the same int8 model with "
        "`image_projector.tokens = \"prefix\"`, where only the class token passes through the backbone.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
