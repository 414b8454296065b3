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
- ``int8 trunk alone`` (diagnostic, not an image path): ``qmodel.image_encoder`` only;
- ``ernie bf16 autocast, gates closed``: the fp32 model's ``encode_image`` under bf16 autocast
  (``at_precision(model, "bf16")``; AMX / AVX512-BF16 GEMMs where the CPU has them), no goal;
- ``onnxruntime int8`` (the anchor a CPU user picks for int8): the same open_clip image tower
  exported to ONNX and quantized by ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights),
  run by ONNX Runtime's CPU provider at the same thread count; skipped when onnxruntime / onnx are
  not installed.
A bf16 section times ``encode_image`` / ``encode_text`` / ``encode_video`` of the fp32 model under
bf16 autocast (``ernie_vl.precision.at_precision``) against fp32 and int8, with cosines to fp32.
Goals (verdicts computed here, written through bench/_report.py to quantize.md / quantize.json):
int8 image path >= 2.5x open_clip fp32 at batch 8 and 32, >= 1.0x the ONNX Runtime int8 figure,
cosine to fp32 >= 0.99. Also prints the size ratio (safetensors bytes) and the cosine similarity of int8 against fp32
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
sys.path.append(str(ROOT / "bench"))  # after the root: bench/encoders.py must not shadow the package

from _report import Verdict, command_line, machine, write_results  # noqa: E402

ANCHOR = "open_clip fp32"
ORT = "onnxruntime int8 (anchor)"
SPEED_GOAL, ORT_GOAL, COSINE_GOAL = 2.5, 1.0, 0.99


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


def onnxruntime_int8(clip, folder: str, threads: int) -> tuple[Callable | None, str]:
    """open_clip's image tower exported to ONNX, dynamically quantized to int8 by ONNX Runtime, as a
    callable (B, 3, H, W) tensor -> (B, D) tensor; (None, why) when onnxruntime / onnx are missing."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        return None, f"skipped: {err}"

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_image(x)

    fp32_path, int8_path = f"{folder}/tower.onnx", f"{folder}/tower-int8.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tower().eval(), (torch.randn(2, 3, 224, 224),), fp32_path, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False,
                          opset_version=17)
        quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # no busy-waiting after a run: spinning threads would take the cores from the next contender
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(int8_path, options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    return run, f"onnxruntime {ort.__version__}, quantize_dynamic QInt8, opset 17, {threads} intra-op threads, no spinning"


def bf16_section(model, bf16, qmodel, rounds: int) -> tuple[list[str], dict[str, float]]:
    """encode_image / encode_text / encode_video at fp32, bf16 autocast (``bf16``: the model under
    ``at_precision(model, "bf16")``) and int8: speed and cosine to fp32."""
    from ernie_vl.precision import bf16_native

    torch.manual_seed(2)
    inputs = {"encode_image": torch.randn(8, 3, 224, 224),
              "encode_text": model.tokenizer([f"a photo of object number {i}" for i in range(8)]),
              "encode_video": torch.randn(1, 8, 3, 224, 224)}
    lines = ["", "## bf16 autocast on the CPU: ErnieVL (from open_clip ViT-B-32) encode_* at fp32, bf16, int8", "",
             f"bf16 native on this CPU (AVX512-BF16 or AMX-BF16): **{bf16_native()}**. Inputs: 8 images, 8 texts, "
             f"1 clip of 8 frames; {rounds} interleaved rounds, medians; gates as built (closed).", "",
             "| call | fp32 s | bf16 s | int8 s | bf16 speed-up | int8 speed-up | bf16 cosine | int8 cosine |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    cosines: dict[str, float] = {}
    for method, x in inputs.items():
        fns = {p: getattr(m, method) for p, m in (("fp32", model), ("bf16", bf16), ("int8", qmodel))}
        with torch.inference_mode():
            ref = fns["fp32"](x)
            cos = {p: F.cosine_similarity(fns[p](x).float(), ref).min().item() for p in ("bf16", "int8")}
        times: dict[str, list[float]] = {p: [] for p in fns}
        names = list(fns)
        for r in range(rounds):
            for p in names[r % 3:] + names[: r % 3]:
                times[p].append(timed(fns[p], x)[0])
        t = {p: statistics.median(v) for p, v in times.items()}
        cosines[f"{method} bf16"], cosines[f"{method} int8"] = cos["bf16"], cos["int8"]
        lines.append(f"| {method} | {t['fp32']:.3f} | {t['bf16']:.3f} | {t['int8']:.3f} | "
                     f"{t['fp32'] / t['bf16']:.2f}x | {t['fp32'] / t['int8']:.2f}x | {cos['bf16']:.4f} | {cos['int8']:.4f} |")
        print(lines[-1], flush=True)
    return lines, cosines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8 only, 2 rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 section")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = parser.parse_args()
    if args.quick:
        args.batches = [8]
    if args.rounds < 5:
        parser.error(f"--rounds must be at least 5, got {args.rounds}")
    load_before = os.getloadavg()[0]
    torch.set_num_threads(2)
    torch.manual_seed(0)

    import open_clip
    from tqdm import tqdm

    import ernie_vl
    from ernie_vl.precision import at_precision
    from ernie_vl.int8_engines import DEFAULT_KERNEL, PROBE_MARGIN, PROBE_REPEATS, probe_records
    from ernie_vl.quantize import available_int8_kernels, int8_kernel_choice, state_dict_bytes

    try:
        import torchao  # noqa: F401
        torchao_note = f"torchao {torchao.__version__} installed (not used)"
    except ImportError:
        torchao_note = "torchao not installed"

    clip = open_clip.create_model("ViT-B-32").eval()
    model = ernie_vl.from_open_clip(clip, num_experts=8, top_k=2)
    qmodel = ernie_vl.quantize_int8(model)
    bf16_model = at_precision(model, "bf16")
    kernel = int8_kernel_choice()

    variants = {
        ANCHOR: clip.encode_image,
        "ernie fp32, gates closed": model.encode_image,
        "ernie int8, gates closed": qmodel.encode_image,
        "ernie bf16 autocast, gates closed": bf16_model.encode_image,
        "ernie int8, gates open": with_gates(qmodel, 1.0),
        "ernie int8, gates open, cls-only": with_gates(qmodel, 1.0, "prefix"),
        "int8 trunk alone (diagnostic)": qmodel.image_encoder,
    }
    onnx_dir = tempfile.TemporaryDirectory()
    ort_fn, ort_note = onnxruntime_int8(clip, onnx_dir.name, torch.get_num_threads())
    if ort_fn is not None:
        variants[ORT] = ort_fn
    print(f"ONNX Runtime anchor: {ort_note}")

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
        if ort_fn is not None:
            cos["onnxruntime int8 image vs open_clip fp32"] = F.cosine_similarity(
                ort_fn(x), clip.encode_image(x)).min().item()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/fp32")
        qmodel.save_pretrained(f"{tmp}/int8")
        fp32_bytes = (Path(tmp) / "fp32" / "model.safetensors").stat().st_size
        int8_bytes = (Path(tmp) / "int8" / "model.safetensors").stat().st_size
    print(f"int8 engine policy {kernel} (available: {', '.join(available_int8_kernels())}); "
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
        for fn in variants.values():  # warm-up (builds the int8 packed weights, probes each GEMM shape)
            timed(fn, x)
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in tqdm(range(args.rounds), desc=f"batch {batch}"):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotated order
                wall, cpu = timed(variants[name], x)
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

    bf16_lines, bf16_cos = ([], {}) if args.no_bf16 else bf16_section(model, bf16_model, qmodel, args.rounds)
    onnx_dir.cleanup()
    facts = machine(load_before)
    load = f" (load {min(loads + [load_before]):.1f}-{max(loads + [load_before]):.1f})"
    path = "ernie int8, gates closed"
    verdicts = []
    for b, row in results.items():
        verdicts.append(Verdict(f"int8 image path ({path}) / open_clip ViT-B-32 fp32 encode_image, batch {b}",
                                f">= {SPEED_GOAL}x", f"{row[path][1]:.2f}x" + load, row[path][1] >= SPEED_GOAL, "11"))
        if ORT in row:
            vs_ort = row[path][1] / row[ORT][1]
            verdicts.append(Verdict(f"int8 image path / ONNX Runtime dynamic int8 of the same tower, batch {b} "
                                    f"(ORT {row[ORT][1]:.2f}x open_clip fp32)", f">= {ORT_GOAL}x",
                                    f"{vs_ort:.2f}x" + load, vs_ort >= ORT_GOAL, "11"))
        else:
            verdicts.append(Verdict(f"int8 image path / ONNX Runtime dynamic int8, batch {b}", f">= {ORT_GOAL}x",
                                    f"not measured ({ort_note})", None, "11"))
    int8_cos = {k: v for k, v in cos.items() if "onnxruntime" not in k}
    verdicts.append(Verdict("int8 / fp32 embedding cosine, min over image (gates closed, open), text, video",
                            f">= {COSINE_GOAL}", f"{min(int8_cos.values()):.4f}", min(int8_cos.values()) >= COSINE_GOAL, "11"))
    if bf16_cos:
        low = min(v for k, v in bf16_cos.items() if k.endswith("bf16"))
        verdicts.append(Verdict("bf16 autocast / fp32 embedding cosine, min over encode_image, encode_text, "
                                "encode_video", f">= {COSINE_GOAL}", f"{low:.4f}", low >= COSINE_GOAL, "-"))
    records = probe_records()
    picked = ", ".join(f"{rows}x{k}->{n}{'+' + act if act else ''}: {rec.kernel} "
                       f"({', '.join(f'{e} {s * 1e3:.2f} ms' for e, s in rec.medians.items())})"
                       for (rows, k, n, _, act), rec in sorted(records.items(), key=lambda kv: str(kv[0])))
    grids = sorted({m.grid for m in qmodel.modules() if hasattr(m, "grid")})
    lines = [
        "# int8 quantization: ErnieVL image path vs open_clip ViT-B-32 fp32 and ONNX Runtime int8",
        "",
        f"Command: `{command_line('quantize.py')}`",
        "",
        facts.line(),
        "",
        f"`torch.set_num_threads(2)`, int8 engine policy `{kernel}` (available: "
        f"{', '.join(available_int8_kernels())}; {torchao_note}); {args.rounds} interleaved rounds in rotated "
        f"order, medians; 1-minute load average after each batch size: "
        f"{', '.join(f'{b}: {load:.1f}' for b, load in zip(args.batches, loads))}. When the load is above the "
        "core count the machine was shared with other jobs: absolute figures are low and noisy, read the ratios "
        "(same process, interleaved). `x wall` is the images/s ratio; `x cpu-time` the ratio of process CPU "
        "time per call. ONNX Runtime anchor: " + ort_note + ".",
        "",
        "| goal | measured | met |",
        "|---|---:|---|",
    ]
    lines += [f"| {v.what} {v.goal} | {v.measured} | {'-' if v.met is None else 'yes' if v.met else 'no'} |"
              for v in verdicts]
    lines += [
        "",
        f"- int8 engine chosen per GEMM shape (rows x in -> out [+ fused activation], {torch.get_num_threads()} "
        f"threads) by the one-time probe ({PROBE_REPEATS} interleaved samples per engine, medians; the default "
        f"{DEFAULT_KERNEL} kept unless the other is > {PROBE_MARGIN:.0%} faster): {picked or 'none probed'}",
        f"- activation grid of the int8 layers: {', '.join(f'{g.bit_length()} bits (u8 0..{g})' for g in grids)}",
        f"- model size (safetensors): fp32 {fp32_bytes / 1e6:.0f} MB -> int8 {int8_bytes / 1e6:.0f} MB, "
        f"ratio **{int8_bytes / fp32_bytes:.3f}**",
        "- min cosine similarity to fp32 (random inputs): " + ", ".join(f"{k} **{v:.4f}**" for k, v in cos.items()),
        "- int8 over fp32 speed-up of the GEMMs alone (the four linear shapes of a ViT-B/32 block, 400 rows = "
        "batch 8; fp32 `F.linear` vs `Int8Linear`): " + ", ".join(f"{k} **{v:.2f}x**" for k, v in ceiling.items()),
        "",
        "| batch | variant | images/s | x wall vs open_clip fp32 | x cpu-time |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, row in results.items():
        lines += [f"| {batch} | {name} | {ips:.2f} | {ratio:.2f}x | {cpu_ratio:.2f}x |"
                  for name, (ips, ratio, cpu_ratio) in row.items()]
    lines += [
        "",
        "Variants: see the docstring of `bench/quantize.py`. `gates closed` is a from_open_clip model at "
        "initialisation (visual residual gates exactly 0): the exact closed-gate shortcut skips the backbone "
        "blocks for the image tokens, so this path is the int8 ViT-B/32 trunk plus projector and head. `gates "
        "open` sets every visual gate to 1.0 (the compute of a model whose training opened the gates: all 50 "
        "tokens per image through 12 attention + 8-expert top-2 MoE blocks). `cls-only` sends only the class "
        "token into the backbone. `int8 trunk alone` is a diagnostic (the image encoder only).",
    ] + bf16_lines
    print("wrote", write_results("quantize", "\n".join(lines), verdicts, facts, command_line("quantize.py"),
                                 args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
