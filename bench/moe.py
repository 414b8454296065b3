"""Benchmark the MoE feed-forward layer (issue 3).

Same process, interleaved rounds, medians, 2 threads; d_model 512, expert hidden 2048,
8 experts, top-2, 4096 tokens; forward (no grad) and forward+backward:
  1. our dropless layer vs a dense MLP with the same active parameters (hidden 4096);
  2. our layer vs transformers' MixtralSparseMoeBlock with the same (SwiGLU) weights;
  3. tokens/s of capacity mode at factor 1.25.
Writes bench/results/moe.md.

    .venv/bin/python bench/moe.py            # default (~3 min on a quiet 2-core machine)
    .venv/bin/python bench/moe.py --quick    # 1024 tokens, 2 rounds (< 1 min)

The dense anchor is an ordinary ``nn.Linear -> F.gelu -> nn.Linear`` (exact erf GELU, the
same activation as our experts, float32 like ours). Besides the 2-thread wall-clock rounds,
ours and the dense MLP also run single-threaded, timed by the calling thread's CPU time
(with one thread all work runs on that thread, so other jobs on the shared machine inflate
it far less than wall-clock time).
"""
from __future__ import annotations

import argparse
import os
import platform
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

from ernie_vl.moe import DenseMLP, MoEFeedForward  # noqa: E402
from ernie_vl.moe import gemm  # noqa: E402
from ernie_vl.moe.grouped import choose_kernel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "moe.md"


def build(d_model: int, hidden: int, num_experts: int, top_k: int) -> dict[str, torch.nn.Module]:
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoEFeedForward(d_model, hidden, num_experts, top_k)
    dense = DenseMLP(d_model, hidden * top_k)
    capacity = MoEFeedForward(d_model, hidden, num_experts, top_k, dispatch="capacity", capacity_factor=1.25)
    capacity.load_state_dict(ours.state_dict())
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
    for m in (ours, dense, capacity, mixtral, ours_swiglu):
        m.train()
    # the same layers with every expert product on torch's BLAS (see on_torch_gemm)
    return {"ours": ours, "dense": dense, "capacity": capacity, "mixtral": mixtral, "ours_swiglu": ours_swiglu,
            "ours_torch_gemm": ours, "ours_swiglu_torch_gemm": ours_swiglu, "dense_openblas": DenseOnOpenBLAS(dense)}


class OpenBLASLinear(torch.autograd.Function):
    """``x @ w.T + b`` with its products on numpy's OpenBLAS (its own threads, fresh outputs
    like nn.Linear): the dense anchor on the same BLAS as our experts (a context row)."""

    @staticmethod
    def forward(ctx, x, w, b):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return torch.from_numpy(np.matmul(x.detach().numpy(), w.detach().numpy().T)).add_(b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        g = grad.contiguous().numpy()
        return (torch.from_numpy(g @ w.detach().numpy()), torch.from_numpy(g.T @ x.detach().numpy()),
                grad.sum(0))


class DenseOnOpenBLAS(torch.nn.Module):
    """The dense anchor's weights, every product on numpy's OpenBLAS."""

    def __init__(self, dense: DenseMLP) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, proj = self.dense.fc, self.dense.proj
        return OpenBLASLinear.apply(F.gelu(OpenBLASLinear.apply(x, fc.weight, fc.bias)), proj.weight, proj.bias)


def on_torch_gemm(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the expert products forced onto torch's BLAS for the ``*_torch_gemm`` candidates."""
    if not name.endswith("_torch_gemm"):
        return fn

    def run() -> None:
        saved = gemm.GEMM
        gemm.GEMM = "torch"
        try:
            fn()
        finally:
            gemm.GEMM = saved
    return run


def forward_fn(name: str, module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            if name == "mixtral":
                module(x.unsqueeze(0))
            elif name.startswith("dense"):
                module(x)
            else:
                module(x).output
    return on_torch_gemm(name, run)


def train_fn(name: str, module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    xg = x.clone().requires_grad_(True)

    def run() -> None:
        module.zero_grad(set_to_none=True)
        xg.grad = None
        if name == "mixtral":
            loss = module(xg.unsqueeze(0)).square().mean()
        elif name.startswith("dense"):
            loss = module(xg).square().mean()
        else:
            out = module(xg)
            loss = out.output.square().mean() + out.aux_loss
        loss.backward()
    return on_torch_gemm(name, run)


def measure(fns: dict[str, Callable[[], None]], rounds: int, desc: str,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Interleaved rounds (order rotates each round) after one warm-up call each;
    ``times[name][r]`` is round r."""
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


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a / b`` measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 2 rounds")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/moe.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokens = args.tokens or (1024 if args.quick else 4096)
    rounds = args.rounds or (2 if args.quick else 7)
    d_model, hidden, num_experts, top_k = 512, 2048, 8, 2
    load_before = os.getloadavg()
    modules = build(d_model, hidden, num_experts, top_k)
    x = torch.randn(tokens, d_model)
    with torch.no_grad():  # the OpenBLAS dense anchor computes the same function
        torch.testing.assert_close(modules["dense_openblas"](x[:64]), modules["dense"](x[:64]), atol=1e-4, rtol=1e-4)

    fwd = measure({k: forward_fn(k, m, x) for k, m in modules.items()}, rounds, "forward")
    load_fwd = os.getloadavg()[0]
    train = measure({k: train_fn(k, m, x) for k, m in modules.items()}, rounds, "fwd+bwd")
    load_train = os.getloadavg()[0]
    torch.set_num_threads(1)  # no thread barriers: compute efficiency alone, robust to a loaded machine
    one_thread = ("ours", "ours_torch_gemm", "dense")
    single = measure({k: forward_fn(k, modules[k], x) for k in one_thread}, rounds, "forward, 1 thread",
                     time.thread_time)
    single_t = measure({k: train_fn(k, modules[k], x) for k in one_thread}, rounds, "fwd+bwd, 1 thread",
                       time.thread_time)
    torch.set_num_threads(2)
    med_s = {k: statistics.median(v) for k, v in single.items()}
    med_st = {k: statistics.median(v) for k, v in single_t.items()}
    med_f = {k: statistics.median(v) for k, v in fwd.items()}
    med_t = {k: statistics.median(v) for k, v in train.items()}
    with torch.no_grad():
        cap_out = modules["capacity"](x)
        ours_out = modules["ours"](x)
    dropped = int(cap_out.stats.dropped_tokens) / (tokens * top_k)
    counts = modules["ours"].route_tokens(x, None, None).plan.counts
    padding = num_experts * max(counts) / sum(counts) - 1.0
    kernel_2t = choose_kernel(counts)
    torch.set_num_threads(1)
    kernel_1t = choose_kernel(counts)
    torch.set_num_threads(2)
    load_after = os.getloadavg()

    rows = [
        ("dropless (GELU MLP experts) / dense MLP hidden 4096", med_f["ours"], med_f["dense"],
         med_t["ours"], med_t["dense"], "<= 0.85 fwd, <= 1.0 fwd+bwd"),
        ("dropless (SwiGLU experts) / transformers MixtralSparseMoeBlock", med_f["ours_swiglu"],
         med_f["mixtral"], med_t["ours_swiglu"], med_t["mixtral"], ">= 1.2x faster (ratio <= 0.83)"),
        ("capacity 1.25 / dropless", med_f["capacity"], med_f["ours"], med_t["capacity"], med_t["ours"], "-"),
        ("dropless, expert products forced onto torch's BLAS / dense MLP", med_f["ours_torch_gemm"], med_f["dense"],
         med_t["ours_torch_gemm"], med_t["dense"], "(context)"),
        ("dropless SwiGLU, expert products forced onto torch's BLAS / Mixtral", med_f["ours_swiglu_torch_gemm"],
         med_f["mixtral"], med_t["ours_swiglu_torch_gemm"], med_t["mixtral"], "(context)"),
        ("dropless / dense MLP with its products on numpy's OpenBLAS (2 threads)", med_f["ours"],
         med_f["dense_openblas"], med_t["ours"], med_t["dense_openblas"], "(context)"),
    ]
    lib = gemm.openblas()
    how = (f"`ernie_vl.moe.gemm.GEMM = {gemm.GEMM!r}`; CPU vendor {gemm.cpu_vendor() or 'unknown'}, torch's BLAS "
           f"{'MKL' if torch.backends.mkl.is_available() else 'not MKL'}")
    blas_line = (f"- Expert products on **{gemm.backend()}** ({how}). numpy's BLAS: "
                 + (f"OpenBLAS {lib.version}, {lib.architecture} kernels" if lib else "not OpenBLAS") + ". The first two "
                 "`(context)` rows force torch's BLAS onto our experts, the third puts the dense MLP on OpenBLAS, "
                 "in the same rounds: the part of the figures that the dispatch alone gives.")
    cmd = "cd /work/main && .venv/bin/python bench/moe.py" + (" --quick" if args.quick else "")
    if args.tokens or args.rounds:
        cmd += "".join(f" --{k} {v}" for k, v in (("tokens", args.tokens), ("rounds", args.rounds)) if v)
    lines = [
        "# MoE feed-forward benchmark (issue 3)",
        "",
        f"Command: `{cmd}`",
        "",
        f"d_model {d_model}, expert hidden {hidden}, {num_experts} experts, top-{top_k}, {tokens} tokens, float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"{rounds} interleaved rounds, medians (seconds per call).",
        "",
        f"**Machine load:** 1-minute load average {load_before[0]:.1f} before, {load_fwd:.1f} after the 2-thread "
        f"forward rounds, {load_train:.1f} after the 2-thread fwd+bwd rounds, {load_after[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores shared with other jobs, so absolute times are inflated and noisy; the "
        "ratios compare runs of the same rounds.",
        "",
        "| comparison | fwd ours | fwd anchor | fwd ratio | fwd+bwd ours | fwd+bwd anchor | fwd+bwd ratio | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f_a, f_b, t_a, t_b, goal in rows:
        lines.append(f"| {name} | {f_a:.3f} | {f_b:.3f} | {f_a / f_b:.2f} | {t_a:.3f} | {t_b:.3f} | "
                     f"{t_a / t_b:.2f} | {goal} |")
    lines += [
        "",
        blas_line,
        f"- 2 threads, median of the per-round ratios (ours and dense timed in the same round): forward "
        f"**{paired_ratio(fwd, 'ours', 'dense'):.2f}x**, fwd+bwd **{paired_ratio(train, 'ours', 'dense'):.2f}x** "
        f"(expert products on torch's BLAS: {paired_ratio(fwd, 'ours_torch_gemm', 'dense'):.2f}x, "
        f"{paired_ratio(train, 'ours_torch_gemm', 'dense'):.2f}x).",
        f"- 1 thread, CPU time of the calling thread, medians of {rounds} interleaved rounds: forward dropless "
        f"{med_s['ours']:.3f} s vs dense {med_s['dense']:.3f} s = **{med_s['ours'] / med_s['dense']:.2f}x**; "
        f"fwd+bwd {med_st['ours']:.3f} s vs {med_st['dense']:.3f} s = **{med_st['ours'] / med_st['dense']:.2f}x**; "
        f"expert products on torch's BLAS: forward {med_s['ours_torch_gemm'] / med_s['dense']:.2f}x, fwd+bwd "
        f"{med_st['ours_torch_gemm'] / med_st['dense']:.2f}x "
        "(no thread barriers, and time spent descheduled is not counted, so these ratios are the least "
        "sensitive to other jobs on the machine).",
        f"- ours vs Mixtral: forward {med_f['mixtral'] / med_f['ours_swiglu']:.2f}x faster, "
        f"fwd+bwd {med_t['mixtral'] / med_t['ours_swiglu']:.2f}x faster.",
        f"- capacity mode (factor 1.25): {tokens / med_f['capacity']:,.0f} tokens/s forward, "
        f"{tokens / med_t['capacity']:,.0f} tokens/s fwd+bwd; {dropped:.1%} of assignments dropped "
        f"(dropless: {tokens / med_f['ours']:,.0f} / {tokens / med_t['ours']:,.0f} tokens/s).",
        f"- activated expert-parameter ratio (top-2 of 8): {float(ours_out.stats.activated_param_ratio):.3f}; "
        f"router entropy at init {float(ours_out.stats.router_entropy):.3f} nats (max {torch.log(torch.tensor(8.0)):.3f}).",
        "",
        "All timings per candidate: " + "; ".join(
            f"{k} fwd [{', '.join(f'{t:.2f}' for t in fwd[k])}] fwd+bwd [{', '.join(f'{t:.2f}' for t in train[k])}]"
            for k in modules),
    ]
    lines += [
        "1-thread CPU times: " + "; ".join(
            f"{k} fwd [{', '.join(f'{t:.2f}' for t in single[k])}] fwd+bwd "
            f"[{', '.join(f'{t:.2f}' for t in single_t[k])}]" for k in single),
        "",
        "How the dropless layer runs (ernie_vl/moe/grouped.py, threaded.py, router.py): the router's small "
        "(tokens, experts) ops (linear, softmax, top-k, logsumexp, load-balance sums; one autograd node with a "
        "closed-form backward) and the routing statistics run on one intra-op thread, because with two threads "
        "every small op ends in a thread barrier that costs up to a scheduler time slice on a shared machine; one "
        "stable argsort of the (N, k) choices plans the dispatch. Then each expert is one task (gather its rows, "
        "product, activation in place, product; backward: recompute the activation, the two weight gradients "
        "written straight into the stacked gradient, the input gradient): with 2 threads the tasks run on 2 "
        "persistent single-threaded worker threads, each taking whole experts, largest first (no intra-op "
        "barriers, no padding; the padded batched kernel, which would pad every expert here by "
        f"{padding:.1%}, stays selectable); with 1 thread one after the other. One gather + batched (1 x k) @ "
        "(k x D) product combines. Temporaries that never leave a call live in per-thread scratch buffers "
        "reused across calls (ernie_vl/moe/workspace.py), because a fresh 64 MB tensor costs ~45 ms of page "
        "faults on one core here; training saves only the pre-activations, one tensor per expert (each small "
        "enough to be served from reused heap memory), and recomputes the activation in the backward pass. The "
        "dense MLP is timed as any user would run it (its 64 MB intermediates are fresh tensors on every call). "
        f"Kernel chosen: {kernel_2t} with 2 threads, {kernel_1t} with 1 thread.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
