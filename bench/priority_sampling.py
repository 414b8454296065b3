"""Loss-priority sampling vs uniform sampling: steps to a target held-out loss (BRIEF.md #6 claims 25% faster).

Same process, same data, same model init per seed; the samplers run interleaved (seed 0 each
sampler, seed 1 each sampler, ...). Task: the synthetic captioned shapes (image-text contrastive;
plus motion clips with ``--motion``). Every ``--eval-every`` steps the held-out loss (the model's
contrastive loss on the fixed held-out pairs: unseen colour-shape combinations) is measured; the
target is ``--target`` or, by default, the held-out loss that the *uniform* runs reach at the end
(median over seeds). Samplers: ``priority`` (losses recorded as ratios to their batch's mean,
``priority_relative=True``), ``priority_absolute`` (raw per-sample losses, the sampler before that
option) and ``uniform`` (shuffled epochs). Writes bench/results/priority_sampling.md and .json with
the verdict: median steps-to-target ratio priority / uniform <= 0.75 (the brief's 25% faster).

    .venv/bin/python bench/priority_sampling.py                      # 3 seeds x 150 steps, 3 samplers
    .venv/bin/python bench/priority_sampling.py --samplers priority uniform --seeds 2
    .venv/bin/python bench/priority_sampling.py --quick              # 3 seeds x 40 steps
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._report import Verdict, command_line, machine, verdict_lines, write_results  # noqa: E402
from bench._work import WORK_HELP, work_folder  # noqa: E402
from ernie_vl.data.synthetic import make_motion, make_shapes  # noqa: E402
from ernie_vl.train import TrainConfig  # noqa: E402
from ernie_vl.train.trainer import Trainer  # noqa: E402

GOAL = 0.75  # BRIEF.md #6: convergence 25% faster -> priority needs <= 0.75x the uniform steps
# bench sampler name -> TrainConfig fields (both pair and clip sampling follow it)
SAMPLERS = {"priority": {"sampler": "priority", "priority_relative": True},
            "priority_absolute": {"sampler": "priority", "priority_relative": False},
            "uniform": {"sampler": "uniform"}}


def heldout_loss(trainer: Trainer) -> float:
    """Mean contrastive loss over the held-out pairs, in chunks of the training batch size (eval mode)."""
    from ernie_vl.model import ErnieVLBatch

    model, pairs = trainer.model, trainer.val_pairs
    model.eval()
    losses = []
    with torch.no_grad():
        n = len(pairs) - len(pairs) % trainer.cfg.batch_pairs
        for start in range(0, n, trainer.cfg.batch_pairs):
            ids = torch.arange(start, start + trainer.cfg.batch_pairs)
            images, texts = pairs.batch(ids)
            losses.append(float(model(ErnieVLBatch(images=images, texts=texts)).losses["image_text"]))
    model.train()
    return sum(losses) / len(losses)


def run_one(args, data: dict, sampler: str, seed: int) -> list[tuple[int, float]]:
    fields = SAMPLERS[sampler]
    cfg = TrainConfig(out=str(Path(args.work) / f"{sampler}_{seed}"), model=args.model, pairs=[str(data["pairs"])],
                      videos=[str(data["videos"])] if args.motion else [], val_pairs=str(data["heldout"]),
                      batch_pairs=args.batch, batch_videos=args.batch // 2, max_steps=args.steps,
                      warmup_steps=max(1, args.steps // 20), lr=args.lr, seed=seed, num_workers=1, progress=False,
                      threads=args.threads, video_sampler=fields["sampler"],
                      **fields)
    trainer = Trainer(cfg)
    curve = [(0, heldout_loss(trainer))]
    while trainer.step < args.steps:
        trainer.train_step()
        if trainer.step % args.eval_every == 0:
            curve.append((trainer.step, heldout_loss(trainer)))
    return curve


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def ratio_of(curves: dict[str, dict[int, list]], sampler: str, target: float, seeds: int) -> tuple[list, list]:
    """(per-seed (steps of ``sampler``, steps of uniform), ratios where both reached ``target``)."""
    pairs, ratios = [], []
    for seed in range(seeds):
        sp, su = steps_to(curves[sampler][seed], target), steps_to(curves["uniform"][seed], target)
        pairs.append((sp, su))
        if sp is not None and su is not None and su > 0:
            ratios.append(sp / su)
    return pairs, ratios


def verdict_of(sampler: str, pairs: list, ratios: list) -> Verdict:
    reached = sum(sp is not None for sp, _ in pairs)
    uniform_reached = sum(su is not None for _, su in pairs)
    what = f"Loss-priority sampling (`{sampler}`): steps to the uniform runs' final held-out loss, priority / uniform"
    goal = f"<= {GOAL:g} (BRIEF.md #6: 25% faster)"
    if not ratios:
        return Verdict(what, goal, f"not computable: {sampler} reached the target in {reached} of {len(pairs)} "
                       f"seeds, uniform in {uniform_reached}", False, claim="6")
    median = statistics.median(ratios)
    return Verdict(what, goal, f"{median:.2f} (median of {len(ratios)} seed{'s' * (len(ratios) > 1)}; {sampler} reached the target in "
                   f"{reached} of {len(pairs)}, uniform in {uniform_reached})", median <= GOAL, claim="6")


def report(curves: dict, seconds: dict, target: float, args, facts, verdicts: list[Verdict]) -> str:
    samplers = list(curves)
    rows = []
    for seed in range(args.seeds):
        steps = [steps_to(curves[s][seed], target) for s in samplers]
        rows.append(f"| {seed} | " + " | ".join("not reached" if n is None else str(n) for n in steps) + " | "
                    + " | ".join(f"{curves[s][seed][-1][1]:.4f}" for s in samplers) + " | "
                    + " | ".join(f"{seconds[s][seed]:.0f}" for s in samplers) + " |")
    mean_final = " | ".join(f"{statistics.mean(curves[s][k][-1][1] for k in range(args.seeds)):.4f}" for s in samplers)
    lines = [
        "# Loss-priority sampling vs uniform", "",
        f"Command: `{command_line('priority_sampling.py')}`", "",
        f"Task: synthetic captioned shapes{' + motion clips' if args.motion else ''}, `{args.model}` preset, "
        f"{args.batch} pairs per step, {args.steps} steps, lr {args.lr}, {args.threads or 2} thread(s); held-out "
        f"loss = image-text contrastive loss on 128 held-out pairs (unseen colour-shape combinations), measured "
        f"every {args.eval_every} steps. Target held-out loss: {target:.4f} "
        f"({'given' if args.target else 'the median final loss of the uniform runs'}). Samplers: `priority` records "
        "each per-sample loss as a ratio to its batch's mean (`priority_relative=True`), `priority_absolute` records "
        "the raw loss (the sampler before that option; its recorded losses fall with the step they were taken at, "
        "so it favours samples seen long ago), `uniform` draws shuffled epochs. The priority samplers use alpha 1, eps "
        "0.05 and a 30% uniform share (the `TrainConfig` defaults).", "",
        facts.line() + " Steps to the target do not depend on the load; the seconds do.", "",
        "| seed | " + " | ".join(f"{s}: steps to target" for s in samplers) + " | "
        + " | ".join(f"{s}: final loss" for s in samplers) + " | " + " | ".join(f"{s}: s" for s in samplers) + " |",
        "|---|" + "---:|" * (3 * len(samplers)),
        *rows,
        f"| mean | {' | ' * (len(samplers) - 1)} | {mean_final} | {' | ' * (len(samplers) - 1)} |", "",
        "Verdicts (computed by the script; a ratio < 1 means priority sampling reached the target in fewer steps):", "",
        *verdict_lines(verdicts),
        "", "Curves (step: held-out loss):", "", "```",
        json.dumps({k: {s: [(st, round(l, 4)) for st, l in c] for s, c in v.items()} for k, v in curves.items()}),
        "```",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 seeds x 40 steps")
    p.add_argument("--samplers", nargs="+", default=["priority", "priority_absolute", "uniform"],
                   choices=sorted(SAMPLERS), help="uniform is always run (the target and the ratios need it)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model", default="tiny")
    p.add_argument("--motion", action="store_true", help="train on the motion clips too (the held-out loss stays "
                   "image-text; clips follow the same sampler)")
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help=WORK_HELP)
    p.add_argument("--results", default=None, help="results folder (default bench/results)")
    args = p.parse_args()
    with work_folder(args.work, "ernie_priority_sampling-") as work:
        args.work = str(work)
        if args.quick:
            args.seeds, args.steps, args.eval_every = 3, 40, 5
        samplers = list(dict.fromkeys([s for s in args.samplers if s != "uniform"] + ["uniform"]))
        torch.set_num_threads(args.threads)
        load_before = os.getloadavg()[0]
        data_root = Path(args.work) / "data"
        if not (data_root / "shapes" / "heldout.csv").is_file():
            make_shapes(data_root / "shapes", num_train=2000, num_val=0, num_heldout=128, image_size=32, seed=0)
        if args.motion and not (data_root / "motion" / "train").is_dir():
            make_motion(data_root / "motion", num_train_per_class=32, num_val_per_class=0, size=32, seed=0)
        data = {"pairs": data_root / "shapes" / "train.csv", "heldout": data_root / "shapes" / "heldout.csv",
                "videos": data_root / "motion" / "train"}
        curves: dict[str, dict[int, list]] = {s: {} for s in samplers}
        seconds: dict[str, list[float]] = {s: [] for s in samplers}
        for seed in range(args.seeds):
            for sampler in samplers:  # interleaved
                t0 = time.perf_counter()
                curves[sampler][seed] = run_one(args, data, sampler, seed)
                seconds[sampler].append(time.perf_counter() - t0)
                print(f"seed {seed} {sampler:17s}: final held-out loss {curves[sampler][seed][-1][1]:.4f} "
                      f"({seconds[sampler][-1]:.0f} s)", flush=True)
        target = args.target or statistics.median(curves["uniform"][s][-1][1] for s in range(args.seeds))
        verdicts = [verdict_of(s, *ratio_of(curves, s, target, args.seeds)) for s in samplers if s != "uniform"]
        facts = machine(load_before)
        text = report(curves, seconds, target, args, facts, verdicts)
        write_results("priority_sampling", text, verdicts, facts, command_line("priority_sampling.py"),
                      Path(args.results) if args.results else None)
        print(text.split("Curves")[0])


if __name__ == "__main__":
    main()
