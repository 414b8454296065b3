"""Benchmark the MoE feed-forward layer against a dense MLP and transformers' Mixtral block.

Same process, interleaved rounds in rotated order, medians; 2 threads; d_model 512, expert hidden
2048, 8 experts, top-2, 4096 tokens, float32; forward (no grad) and forward+backward:

1. our dropless layer (``backend="auto"``) vs a dense MLP with the same active parameters (hidden
   4096) on the same BLAS as our expert products (torch's, or numpy's OpenBLAS where ``auto`` runs
   the experts there); goals: forward <= 0.9x, fwd+bwd <= 1.0x;
2. our layer vs transformers' ``MixtralSparseMoeBlock`` with the same (SwiGLU) weights, the block at
   its best: its ``eager`` experts loop and, where transformers and torch have it, its ``grouped_mm``
   implementation, the faster per direction; goal >= 1.2x faster both ways. Also timed: the forward
   expert products alone (same shapes and workers, no routing, gather, activation or combine), the
   floor of any kernel that runs them in fp32, so the script states how far the goal is reachable;
3. context: every expert kernel forced (reference, loop, threads, openblas) against the same dense
   MLP, and one-thread CPU-time ratios; which kernel ``auto`` picks here, and why.

Writes bench/results/moe.md and moe.json (bench/_report.py).

    .venv/bin/python bench/moe.py            # ~3 min on a quiet 2-core machine (run it quiet: 2 cores)
    .venv/bin/python bench/moe.py --quick    # 1024 tokens, 5 rounds
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import Verdict, command_line, machine, write_results  # noqa: E402
from ernie_vl import runtime  # noqa: E402
from ernie_vl.moe import DenseMLP, MoEFeedForward  # noqa: E402
from ernie_vl.moe.kernels.choose import choose_backend, probe_openblas_speedup  # noqa: E402
from ernie_vl.moe.kernels.pool import expert_tasks, run_tasks  # noqa: E402
from ernie_vl.moe.kernels.products import numpy_openblas  # noqa: E402

FWD_GOAL, TRAIN_GOAL, MIXTRAL_GOAL = 0.9, 1.0, 1.2
GEMMS = "expert_gemms"  # the forward expert products alone (a floor, not a candidate)
MIXTRAL_IMPL = {"mixtral": "eager", "mixtral_grouped_mm": "grouped_mm"}


class OpenBLASLinear(torch.autograd.Function):
    """``x @ w.T + b`` on numpy's OpenBLAS (its own threads, fresh outputs like nn.Linear)."""

    @staticmethod
    def forward(ctx, x, w, b):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return torch.from_numpy(np.matmul(x.detach().numpy(), w.detach().numpy().T)).add_(b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        g = grad.contiguous().numpy()
        return (torch.from_numpy(g @ w.detach().numpy()), torch.from_numpy(g.T @ x.detach().numpy()), grad.sum(0))


class DenseOnOpenBLAS(torch.nn.Module):
    """The dense anchor's weights, every product on numpy's OpenBLAS."""

    def __init__(self, dense: DenseMLP) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, proj = self.dense.fc, self.dense.proj
        return OpenBLASLinear.apply(F.gelu(OpenBLASLinear.apply(x, fc.weight, fc.bias)), proj.weight, proj.bias)


def build(d_model: int, hidden: int, num_experts: int, top_k: int, x: torch.Tensor) -> tuple[dict, str]:
    """The candidates (name -> (module, backend or None)), and the backend ``auto`` picks for ``x``."""
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoEFeedForward(d_model, hidden, num_experts, top_k)
    dense = DenseMLP(d_model, hidden * top_k)
    cfg = MixtralConfig(hidden_size=d_model, intermediate_size=hidden, num_local_experts=num_experts,
                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=32)
    cfg._experts_implementation = "eager"  # the block's own loop (what a standalone block runs by default)
    mixtral = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        mixtral.gate.weight.normal_(std=0.02)
        mixtral.experts.gate_up_proj.normal_(std=d_model ** -0.5)
        mixtral.experts.down_proj.normal_(std=hidden ** -0.5)
    ours_swiglu = MoEFeedForward.from_mixtral(mixtral)
    mixtrals = {"mixtral": mixtral} | mixtral_variants(mixtral, x)
    for m in (ours, dense, ours_swiglu, *mixtrals.values()):
        m.train()
    counts = ours.route_tokens(x, None, None).plan.counts
    auto = choose_backend("auto", x, counts).name
    same_blas_dense = DenseOnOpenBLAS(dense) if auto == "openblas" else dense
    candidates = {"ours": (ours, "auto"), "dense": (same_blas_dense, None), "ours_swiglu": (ours_swiglu, "auto")}
    candidates |= {name: (m, None) for name, m in mixtrals.items()}
    if auto == "openblas":
        candidates["dense_torch_blas"] = (dense, None)
    kernels = ["reference", "loop", "threads"] + (["openblas"] if numpy_openblas() is not None else [])
    for k in kernels:
        if k != auto:
            candidates[f"ours_{k}"] = (ours, k)
    return candidates, auto


def mixtral_variants(block: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    """The same Mixtral block on transformers' other CPU-capable experts implementation
    (``grouped_mm``, over ``torch.nn.functional.grouped_mm``), where this transformers and torch have
    it and it gives the eager block's output: the anchor is the faster of the two, per direction."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return {}
    if "grouped_mm" not in ExpertsInterface._global_mapping or not hasattr(torch.nn.functional, "grouped_mm"):
        return {}
    grouped = copy.deepcopy(block)
    grouped.experts.config._experts_implementation = "grouped_mm"
    probe = x[:256].unsqueeze(0)
    with torch.no_grad():
        try:
            same = torch.allclose(grouped(probe), block(probe), rtol=1e-4, atol=1e-5)
        except (RuntimeError, NotImplementedError):
            same = False
    return {"mixtral_grouped_mm": grouped} if same else {}


def expert_gemms_fn(layer: MoEFeedForward, counts: list[int]) -> Callable[[], None]:
    """The forward expert products of ``layer`` (SwiGLU) alone, at these per-expert row ``counts``:
    the same shapes, one expert per single-threaded worker as the ``threads`` kernel, outputs
    preallocated; no routing, gather, activation or combine. A lower bound for any kernel that
    runs these fp32 products on this BLAS."""
    w_gate_up, w_down = (p.detach() for p in layer.experts.params())
    d, hidden = w_down.shape[1], w_down.shape[2]
    gen = torch.Generator().manual_seed(0)
    bufs = [(torch.randn(c, d, generator=gen), torch.empty(c, 2 * hidden), torch.randn(c, hidden),
             torch.empty(c, d)) for c in counts]

    def task(e: int, s: int, t: int) -> None:
        xs, h, a, y = bufs[e]
        torch.mm(xs, w_gate_up[e].t(), out=h)
        torch.mm(a, w_down[e].t(), out=y)

    tasks = [t for t in expert_tasks(counts) if t[2] > t[1]]
    return lambda: run_tasks(task, tasks, parallel=True)


def forward_fn(name: str, module: torch.nn.Module, backend: str | None, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        if backend is not None:
            module.backend = backend
        with torch.no_grad():
            if name.startswith("mixtral"):
                module(x.unsqueeze(0))
            elif backend is None:
                module(x)
            else:
                module(x).output
    return run


def train_fn(name: str, module: torch.nn.Module, backend: str | None, x: torch.Tensor) -> Callable[[], None]:
    xg = x.clone().requires_grad_(True)

    def run() -> None:
        if backend is not None:
            module.backend = backend
        module.zero_grad(set_to_none=True)
        xg.grad = None
        if name.startswith("mixtral"):
            loss = module(xg.unsqueeze(0)).square().mean()
        elif backend is None:
            loss = module(xg).square().mean()
        else:
            out = module(xg)
            loss = out.output.square().mean() + out.aux_loss
        loss.backward()
    return run


def measure(fns: dict[str, Callable[[], None]], rounds: int, desc: str,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Interleaved rounds (order rotated each round) after one warm-up call each; ``times[name][r]``."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in tqdm(range(rounds), desc=desc, leave=False):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return times


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a / b`` measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 5 rounds")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (1024 if args.quick else 4096)
    rounds = max(args.rounds or (5 if args.quick else 7), 5)
    d_model, hidden, num_experts, top_k = 512, 2048, 8, 2
    load_before = os.getloadavg()
    x = torch.randn(tokens, d_model)
    cands, auto = build(d_model, hidden, num_experts, top_k, x)
    ours = cands["ours"][0]
    counts = ours.route_tokens(x, None, None).plan.counts
    choice_nt = choose_backend("auto", x, counts)
    torch.set_num_threads(1)
    choice_1t = choose_backend("auto", x, counts)
    torch.set_num_threads(args.threads)

    swiglu_counts = cands["ours_swiglu"][0].route_tokens(x, None, None).plan.counts
    fwd_fns = {k: forward_fn(k, m, b, x) for k, (m, b) in cands.items()}
    fwd_fns[GEMMS] = expert_gemms_fn(cands["ours_swiglu"][0], swiglu_counts)
    fwd = measure(fwd_fns, rounds, "forward")
    load_fwd = os.getloadavg()[0]
    train = measure({k: train_fn(k, m, b, x) for k, (m, b) in cands.items()}, rounds, "fwd+bwd")
    load_train = os.getloadavg()[0]
    torch.set_num_threads(1)  # no thread barriers; CPU time of the calling thread, robust to other jobs
    one = {k: cands[k] for k in ("ours", "dense")}
    single = measure({k: forward_fn(k, m, b, x) for k, (m, b) in one.items()}, rounds, "forward, 1 thread",
                     time.thread_time)
    single_t = measure({k: train_fn(k, m, b, x) for k, (m, b) in one.items()}, rounds, "fwd+bwd, 1 thread",
                       time.thread_time)
    torch.set_num_threads(args.threads)
    ours.backend = "auto"
    cands["ours_swiglu"][0].backend = "auto"
    load_after = os.getloadavg()
    facts = machine(load_before[0])

    med_f = {k: statistics.median(v) for k, v in fwd.items()}
    med_t = {k: statistics.median(v) for k, v in train.items()}
    r_fwd, r_train = paired(fwd, "ours", "dense"), paired(train, "ours", "dense")
    mixtrals = [k for k in cands if k.startswith("mixtral")]
    mx_f = min(mixtrals, key=lambda k: med_f[k])  # the anchor at its best, per direction
    mx_t = min(mixtrals, key=lambda k: med_t[k])
    mx_fwd, mx_train = 1.0 / paired(fwd, "ours_swiglu", mx_f), 1.0 / paired(train, "ours_swiglu", mx_t)
    ceiling = paired(fwd, mx_f, GEMMS)  # Mixtral / the expert products alone
    dense_blas = "numpy's OpenBLAS" if auto == "openblas" else f"torch's {runtime.torch_blas() or 'BLAS'}"
    load = f" (load {min(load_before[0], load_after[0]):.1f}-{max(load_before[0], load_fwd, load_train, load_after[0]):.1f})"
    verdicts = [
        Verdict(f"MoE forward / dense MLP, same active parameters, same BLAS ({dense_blas})", f"<= {FWD_GOAL}x",
                f"{r_fwd:.2f}x" + load, r_fwd <= FWD_GOAL, "18.4"),
        Verdict(f"MoE fwd+bwd / dense MLP, same active parameters, same BLAS ({dense_blas})",
                f"<= {TRAIN_GOAL}x", f"{r_train:.2f}x" + load, r_train <= TRAIN_GOAL, "18.4"),
        Verdict(f"MoE forward speed-up over transformers' MixtralSparseMoeBlock ({MIXTRAL_IMPL[mx_f]}, the faster; "
                f"its expert products alone would allow at most {ceiling:.2f}x)", f">= {MIXTRAL_GOAL}x",
                f"{mx_fwd:.2f}x" + load, mx_fwd >= MIXTRAL_GOAL, "18.4"),
        Verdict(f"MoE fwd+bwd speed-up over transformers' MixtralSparseMoeBlock ({MIXTRAL_IMPL[mx_t]}, the faster)",
                f">= {MIXTRAL_GOAL}x",
                f"{mx_train:.2f}x" + load, mx_train >= MIXTRAL_GOAL, "18.4"),
    ]
    lib = numpy_openblas()
    probe = probe_openblas_speedup() if lib is not None else 0.0
    kernel_rows = [k for k in cands if k.startswith("ours_") and k != "ours_swiglu"]
    fastest_f = min(["ours"] + kernel_rows, key=lambda k: paired(fwd, k, "dense"))  # per-round ratios: robust to load
    fastest_t = min(["ours"] + kernel_rows, key=lambda k: paired(train, k, "dense"))
    label = {"ours": f"auto ({auto})"} | {k: k.removeprefix("ours_") for k in kernel_rows}
    lines = [
        "# MoE feed-forward benchmark",
        "",
        f"Command: `{command_line('moe.py')}`",
        "",
        facts.line(),
        f"numpy's BLAS: {runtime.numpy_blas()['name'] or 'unknown'} {runtime.numpy_blas()['version']}"
        + (f" ({lib.architecture} kernels); single-thread probe torch.mm / OpenBLAS = {probe:.2f}" if lib else "")
        + ".",
        "",
        f"d_model {d_model}, expert hidden {hidden}, {num_experts} experts, top-{top_k}, {tokens} tokens, float32, "
        f"{args.threads} threads; {rounds} interleaved rounds in rotated order; verdicts on the median of the "
        "per-round ratios (ours and the anchor timed in the same round).",
        f"Load (1-min average) {load_before[0]:.1f} before, {load_fwd:.1f} after the forward rounds, "
        f"{load_train:.1f} after the fwd+bwd rounds, {load_after[0]:.1f} at the end, on {os.cpu_count()} cores "
        "shared with other jobs" + (" (not quiet: absolute times are inflated)." if load_before[0] > 1.0 else "."),
        "",
        f"**Kernel chosen by `backend=\"auto\"`:** {choice_nt.name} with {args.threads} threads ({choice_nt.reason}); "
        f"{choice_1t.name} with 1 thread ({choice_1t.reason}).",
        "",
        "| goal | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {v.what} | {v.measured} | {v.goal} | {'met' if v.met else '**missed**'} |" for v in verdicts]
    lines += [
        "",
        "| candidate | fwd s | fwd / dense | fwd+bwd s | fwd+bwd / dense |",
        "|---|---|---|---|---|",
    ]
    for k in ["ours"] + kernel_rows:
        lines.append(f"| ours, GELU experts, {label[k]} | {med_f[k]:.3f} | {paired(fwd, k, 'dense'):.2f} | "
                     f"{med_t[k]:.3f} | {paired(train, k, 'dense'):.2f} |")
    lines.append(f"| dense MLP hidden {hidden * top_k} ({dense_blas}) | {med_f['dense']:.3f} | 1.00 | "
                 f"{med_t['dense']:.3f} | 1.00 |")
    if "dense_torch_blas" in cands:
        lines.append(f"| dense MLP on torch's BLAS (context) | {med_f['dense_torch_blas']:.3f} | "
                     f"{paired(fwd, 'dense_torch_blas', 'dense'):.2f} | {med_t['dense_torch_blas']:.3f} | "
                     f"{paired(train, 'dense_torch_blas', 'dense'):.2f} |")
    lines += [
        f"| ours, SwiGLU experts, auto | {med_f['ours_swiglu']:.3f} | - | {med_t['ours_swiglu']:.3f} | - |",
    ]
    lines += [f"| transformers MixtralSparseMoeBlock ({MIXTRAL_IMPL[k]}) | {med_f[k]:.3f} | - | {med_t[k]:.3f} | - |"
              for k in mixtrals]
    lines += [
        f"| SwiGLU expert products alone (no routing, gather, activation, combine) | {med_f[GEMMS]:.3f} | - | - | - |",
        "",
        f"- Anchor at its best: forward **{MIXTRAL_IMPL[mx_f]}**, fwd+bwd **{MIXTRAL_IMPL[mx_t]}** (the lower median of "
        f"{', '.join(MIXTRAL_IMPL[k] for k in mixtrals)}). The fp32 expert products alone, same shapes and workers, "
        f"take {1 / ceiling:.2f}x of Mixtral's forward time: no kernel that runs these fp32 products on this BLAS can "
        f"be more than **{ceiling:.2f}x** faster than it (goal {MIXTRAL_GOAL}x); ours is {mx_fwd:.2f}x, "
        f"{paired(fwd, 'ours_swiglu', GEMMS):.2f}x the products alone.",
        f"- Fastest kernel here (lowest per-round ratio to the dense MLP): forward **{label[fastest_f]}**, fwd+bwd **{label[fastest_t]}** "
        f"(`auto` ran {auto}).",
        f"- 1 thread, CPU time of the calling thread (medians of {rounds}): forward ours "
        f"{statistics.median(single['ours']):.3f} s / dense {statistics.median(single['dense']):.3f} s = "
        f"{paired(single, 'ours', 'dense'):.2f}x; fwd+bwd {statistics.median(single_t['ours']):.3f} s / "
        f"{statistics.median(single_t['dense']):.3f} s = {paired(single_t, 'ours', 'dense'):.2f}x.",
        "",
        "Per-round times (s): " + "; ".join(
            f"{k} fwd [{', '.join(f'{t:.3f}' for t in fwd[k])}] fwd+bwd [{', '.join(f'{t:.3f}' for t in train[k])}]"
            for k in cands) + f"; {GEMMS} fwd [{', '.join(f'{t:.3f}' for t in fwd[GEMMS])}]",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print("wrote", write_results("moe", text, verdicts, facts, command_line("moe.py")))


if __name__ == "__main__":
    main()
