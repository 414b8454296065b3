"""``ernie-vl env``: the machine (CPU, ISA, BLAS, threads) and every run-time kernel choice made on it.

The facts come from :mod:`ernie_vl.runtime`; each choice is asked of the code that makes it (the MoE
``backend="auto"`` rule, the int8 engine of :mod:`ernie_vl.quantize`, the decoder-thread policy of
:mod:`video.threads`, the index kind and flat layout of :mod:`retrieval`), so what is printed is what a
call would do now. Text by default, ``--json`` for scripts.
"""
from __future__ import annotations

import argparse
import json
from fractions import Fraction
from typing import Any

import torch

from ernie_vl import runtime

MOE_SHAPE = (4096, 512, 8)  # (tokens, d_model, experts): the MoE call the report asks about


def moe_choices() -> dict[str, Any]:
    """The ``backend="auto"`` choice for an even float32 CPU call, at this thread count and at one."""
    from ernie_vl.moe.kernels.choose import choose_backend, openblas_faster, probe_openblas_speedup
    from ernie_vl.moe.kernels.products import numpy_openblas

    tokens, d_model, experts = MOE_SHAPE
    x = torch.empty(tokens, d_model)
    counts = [tokens * 2 // experts] * experts
    out: dict[str, Any] = {}
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        try:
            choice = choose_backend("auto", x, counts)
        finally:
            torch.set_num_threads(threads)
        out[f"{n}_threads"] = {"backend": choice.name, "reason": choice.reason}
    out["openblas_products"] = openblas_faster()
    if numpy_openblas() is not None and not runtime.cpu_info().is_intel:
        out["openblas_probe_speedup"] = round(probe_openblas_speedup(), 3)
    return out


def int8_choices() -> dict[str, Any]:
    """The int8 GEMM engine :mod:`ernie_vl.quantize` picks (its one-time probe per shape) for a ViT-B
    MLP GEMM (768 -> 3072) at a few row counts, at this thread count and at one."""
    from ernie_vl import quantize

    try:
        available = list(quantize.available_int8_kernels())
        out: dict[str, Any] = {"available": available, "policy": quantize.int8_kernel_choice(),
                               "activation_bits": quantize.layer_activation_qmax().bit_length()}
        threads = torch.get_num_threads()
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            try:
                out[f"{n}_threads"] = {str(rows): quantize.int8_kernel(rows, 768, 3072) for rows in (8, 512)}
                out[f"{n}_threads"]["None"] = quantize.int8_kernel(None)
            finally:
                torch.set_num_threads(threads)
        return out
    except (AttributeError, RuntimeError, TypeError) as err:  # no int8 engine in this torch build
        return {"error": str(err)}


def _synthetic_video(gop: int, frames: int = 250):
    from video.probe import VideoInfo

    return VideoInfo(path="(synthetic)", num_frames=frames, reported_frames=frames, width=640, height=360,
                     codec="h264", time_base=Fraction(1, 25), frame_pts=tuple(range(frames)),
                     keyframes=tuple(range(0, frames, gop)))


def video_choices() -> dict[str, Any]:
    """``threads="auto"`` of :func:`video.open_video` for 8 frames spread over a 250-frame clip,
    long GOP (one key frame) and short GOP (every 10 frames), on this machine now."""
    from video.threads import choose_threads, others_running, usable_cores

    wanted = list(range(15, 250, 30))
    out: dict[str, Any] = {"usable_cores": usable_cores(), "other_threads_running": others_running()}
    for name, gop in (("long_gop", 250), ("short_gop", 10)):
        c = choose_threads(_synthetic_video(gop), wanted)
        out[name] = {"threads": c.count, "kind": c.kind, "reason": c.reason}
    return out


def search_choices() -> dict[str, Any]:
    """The index kind ``auto`` resolves to, and how the exact (flat) store searches here."""
    from retrieval.exact import MIN_ITEMS, MIN_QUERIES, choose_first_stage
    from retrieval.index import AUTO_APPROX_THRESHOLD, resolve_kind

    stage = choose_first_stage("auto")
    layout = ("(N, D) rows + a (D, N) bf16 copy: bf16 candidates, fp32 rescoring (exact)" if stage.name == "bf16"
              else "(D, N) columns: scores = queries @ columns (MKL's fast layout for few queries)")
    return {"auto_kind_below_threshold": resolve_kind("auto", AUTO_APPROX_THRESHOLD - 1),
            "auto_kind_from_threshold": resolve_kind("auto", AUTO_APPROX_THRESHOLD),
            "threshold_items": AUTO_APPROX_THRESHOLD,
            "flat_first_stage": stage.name, "flat_first_stage_reason": stage.reason,
            "flat_two_stage_from_items": MIN_ITEMS, "flat_two_stage_from_queries": MIN_QUERIES, "flat_layout": layout}


MODEL_TOKENS = 512  # the even MoE call each layer of ``--model`` is asked about


def model_choices(spec: str) -> dict[str, Any]:
    """Each MoE layer of the model at ``spec`` (a checkpoint folder, int8 ones included): its ``backend``
    setting and the expert kernel a call of MODEL_TOKENS evenly routed tokens runs on here."""
    from ernie_vl.app.hub import load_model
    from ernie_vl.moe.layer import MoEFeedForward

    loaded = load_model(spec)
    layers: dict[str, Any] = {}
    for name, module in loaded.model.named_modules():
        if not isinstance(module, MoEFeedForward):
            continue
        experts, k = module.config.num_experts, module.top_k
        counts = [MODEL_TOKENS * k // experts] * experts
        layers[name] = {"type": type(module).__name__, "backend": module.backend,
                        "runs": module.expert_backend(torch.empty(MODEL_TOKENS, module.d_model), counts)}
    return {"model": loaded.model_id, "moe_layers": layers}


def environment(model: str | None = None) -> dict[str, Any]:
    """Machine facts and kernel choices (and, given a model spec, its MoE layers'), as plain JSON-ready values."""
    env = {"machine": runtime.machine_facts(),
           "choices": {"moe": moe_choices(), "int8": int8_choices(), "video_decode": video_choices(),
                       "search": search_choices()}}
    if model is not None:
        env["model"] = model_choices(model)
    return env


def _threads(key: str) -> str:
    n = int(key.split("_")[0])
    return f"{n} thread" + ("s" if n != 1 else "")


def format_text(env: dict[str, Any]) -> str:
    """The report as aligned ``key: value`` lines."""
    m, c = env["machine"], env["choices"]
    isa = " ".join(f for f, on in m["isa"].items() if on) or "none of the listed"
    arm = m["machine"].lower() in ("aarch64", "arm64")
    absent = [f for f, on in m["isa"].items() if not on and (f in ("asimd", "sve")) == arm]
    nb = m["numpy_blas"]
    t = m["threads"]
    lines = [
        f"cpu:            {m['cpu_model']} ({m['cpu_vendor'] or 'unknown vendor'})",
        f"isa:            {isa}",
        f"isa (absent):   {' '.join(absent) or '-'}",
        f"torch:          {m['torch']}, BLAS {m['torch_blas'] or 'unknown'}, kernels {m['torch_cpu_capability']}, "
        f"oneDNN {'yes' if m['mkldnn'] else 'no'}, CUDA {'yes' if m['cuda'] else 'no'}",
        f"numpy BLAS:     {nb['name'] or 'unknown'} {nb['version']}"
        + (f" ({nb['architecture']} kernels)" if nb["architecture"] else ""),
        f"threads:        torch intra-op {t['torch_intra_op']}, inter-op {t['torch_inter_op']}, "
        f"usable cores {t['usable_cores']}",
        "",
        "run-time choices on this machine:",
    ]
    for key, v in c["moe"].items():
        if key.endswith("_threads"):
            lines.append(f"  MoE experts, {_threads(key)}: {v['backend']} ({v['reason']})")
    lines.append(f"  MoE products on numpy's OpenBLAS: {'yes' if c['moe']['openblas_products'] else 'no'}")
    i8 = c["int8"]
    if "error" in i8:
        lines.append(f"  int8 engine: unavailable ({i8['error']})")
    else:
        for key, v in i8.items():
            if key.endswith("_threads"):
                per = ", ".join(f"{'varying' if rows == 'None' else rows + ' rows'} -> {k}" for rows, k in v.items())
                lines.append(f"  int8 engine, {_threads(key)}: {per} (policy {i8['policy']}, "
                             f"available {', '.join(i8['available'])})")
        lines.append(f"  int8 activation grid of newly quantized layers: {i8['activation_bits']} bits")
    vd = c["video_decode"]
    for name in ("long_gop", "short_gop"):
        v = vd[name]
        lines.append(f"  video decode threads, {name.replace('_', ' ')}: {v['threads']} {v['kind']} ({v['reason']})")
    s = c["search"]
    lines.append(f"  search index kind auto: {s['auto_kind_below_threshold']} below {s['threshold_items']:,} items, "
                 f"{s['auto_kind_from_threshold']} from there")
    lines.append(f"  exact (flat) search first stage: {s['flat_first_stage']} ({s['flat_first_stage_reason']}), "
                 f"from {s['flat_two_stage_from_items']:,} items and {s['flat_two_stage_from_queries']} queries at once; "
                 f"layout {s['flat_layout']}")
    if "model" in env:
        lines += ["", f"model {env['model']['model']}: MoE layers (backend setting -> kernel of an even "
                      f"{MODEL_TOKENS}-token call)"]
        lines += [f"  {name}: {v['type']}, {v['backend']} -> {v['runs']}"
                  for name, v in env["model"]["moe_layers"].items()] or ["  (none)"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    env = environment(args.model)
    print(json.dumps(env, indent=2) if args.json else format_text(env))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("env", help="print the CPU, ISA flags, BLAS, threads and the kernel choices made here",
                              description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="also list this checkpoint's MoE layers (int8 ones too) and the kernel each runs on")
    p.set_defaults(func=run)
