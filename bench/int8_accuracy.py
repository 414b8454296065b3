"""int8 and bf16 accuracy of a trained `tiny`: held-out retrieval R@1 and action top-1 against fp32.

Goal (BRIEF claim 11, issue 18 item 2): int8 loses at most 1 point of held-out text->image and
image->text R@1 and of motion top-1 (supervised and zero-shot) against fp32, with quantization-aware
fine-tuning where post-training int8 loses more.

The model is the checkpoint ``bench/train_synthetic.py --save-dir DIR`` writes (``--checkpoint
DIR/divided``), or, without ``--checkpoint``, `tiny` trained here for ``--train-steps`` steps on the
same data (a fixed step budget, so the bench is self-contained and does not depend on the load). The
held-out sets are train_synthetic's: 200 captioned shapes of colour-shape combinations never seen in
training (one image = 0.5 point), 16 clips of each of 8 motions (one clip = 0.78 point).

Rows, each evaluated by ``ernie_vl.train.evaluation.evaluate`` on the same held-out sets:
- ``fp32``: the checkpoint as ``ernie-vl serve`` loads it;
- ``int8 PTQ``: ``ernie-vl quantize`` (``quantize_int8``, saved and loaded back with ``from_pretrained``),
  the model ``ernie-vl serve INT8_DIR`` serves; ``int8 PTQ (serve --precision int8)``: the float checkpoint
  quantized on load, as ``ernie-vl serve --precision int8`` does;
- ``bf16``: ``ernie-vl serve --precision bf16`` (bf16 weights, autocast);
- ``int8 QAT``: ``--qat-steps`` steps of quantization-aware fine-tuning (``ernie_vl.quantize_aware``,
  ``ernie-vl quantize --qat-steps``) from the checkpoint, then the same conversion; ``fp32 weights after
  QAT``: those fine-tuned weights evaluated in float (what the extra steps did by themselves; no goal).

The backbone's residual gates are the trained ones, as the server serves them (`tiny` starts with every
gate at 1; the closed-gate rows of ``bench/quantize.py`` are a ``from_open_clip`` model at initialisation,
whose visual gates are 0 until training opens them).

    .venv/bin/python bench/int8_accuracy.py [--checkpoint DIR] [--train-steps 600] [--qat-steps 300]

Each run works in a fresh temporary folder, removed at the end, so a rerun never picks up an earlier
run's data, checkpoint or QAT state; ``--work DIR`` works in DIR instead and keeps it (its generated
data is reused; the training and QAT runs in it start over, as ``ernie-vl train`` without ``--resume``).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from _report import Verdict, command_line, machine, write_results  # noqa: I001 - puts the packages first
from _work import WORK_HELP, work_folder  # noqa: E402

import torch  # noqa: E402

from ernie_vl.train import TrainConfig  # noqa: E402

METRICS = {"text_to_image_R@1": "text->image R@1", "image_to_text_R@1": "image->text R@1",
           "video_top1": "motion top-1, supervised", "video_zeroshot_top1": "motion top-1, zero-shot"}
#: the row of the QAT-fine-tuned weights evaluated in float (reported only)
FLOAT_AFTER_QAT = "fp32 weights after QAT"
#: rows with verdicts besides the QAT one (the ``serve --precision int8`` row is the same int8 model, reported)
VERDICT_ROWS = ("int8 PTQ", "bf16")
#: the most an int8 / bf16 model may lose against fp32, in points (hundredths)
MAX_LOSS_POINTS = 1.0


def train_checkpoint(data: dict, args) -> Path:
    """`tiny` trained ``args.train_steps`` steps on train_synthetic's data (its ``divided`` variant)."""
    from train_synthetic import VARIANTS, train_variant

    model, overrides = VARIANTS["divided"]
    ns = SimpleNamespace(work=args.work, minutes=0, max_steps=args.train_steps, batch_pairs=64, batch_videos=32,
                         lr=TrainConfig.lr, warmup=20, no_progress=args.no_progress, threads=args.threads, seed=0)
    run = train_variant("divided", data, ns, overrides, model)
    print(f"trained {run['steps']} steps in {run['train_wall_s']:.0f} s: {run['metrics']}", flush=True)
    return Path(args.work) / "divided" / "final"


def in_bf16(model):
    """``model`` (an AutocastModel) with ``classify_video`` under the same bf16 autocast as its ``encode_*``."""
    class Bf16(type(model)):
        def classify_video(self, clips):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                return self.model.classify_video(clips).float()

    model.__class__ = Bf16
    return model


def points(value: float, base: float) -> float:
    return round(100.0 * (value - base), 2)


def markdown(rows: dict[str, dict], info: dict, command: str, facts) -> str:
    names = list(rows)
    lines = ["# int8 and bf16 accuracy of a trained `tiny` (held-out sets of `train_synthetic`)", "",
             f"`{command}`", "", facts.line(), "",
             f"Model: {info['model']} (train_synthetic's `divided` variant, its data). QAT: {info['qat']}. int8 kernels: policy `{info['kernel']}` "
             f"(per GEMM shape, ``ernie_vl.quantize``), activations on {info.get('grid', '?')} (the engines' grid "
             "on this CPU; QAT fine-tunes on the same). Held-out: 200 captioned shapes of unseen colour-shape "
             "combinations (one image = 0.5 point), 128 motion clips, 8 classes (one clip = 0.78 point). "
             f"Goal: each precision within {MAX_LOSS_POINTS:g} point of fp32 (a gain counts as within). "
             "Fixed step budgets: the figures do not depend on the machine's load.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRICS.items():
        cells = []
        for n in names:
            v = rows[n][key]
            cells.append(f"{v:.3f}" if n == "fp32" else f"{v:.3f} ({points(v, rows['fp32'][key]):+.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key in ("text_to_image_R@5", "image_to_text_R@5", "video_top5", "video_zeroshot_top5"):
        lines.append(f"| {key} | " + " | ".join(f"{rows[n][key]:.3f}" for n in names) + " |")
    lines += ["", "In brackets: the difference to fp32 in points. Seconds: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in info["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def verdicts(rows: dict[str, dict], model: str) -> list[Verdict]:
    """One row per metric for int8 post-training, int8 QAT (claim 11) and bf16: the loss against fp32 in points."""
    out = []
    base = rows["fp32"]
    for name in rows:
        if name not in VERDICT_ROWS and not name.startswith("int8 QAT"):
            continue
        for key, label in METRICS.items():
            delta = points(rows[name][key], base[key])
            out.append(Verdict(f"{name} - fp32, held-out {label}, {model}", f">= -{MAX_LOSS_POINTS:g} point",
                               f"{delta:+.1f} points ({rows[name][key]:.3f} vs {base[key]:.3f})",
                               delta >= -MAX_LOSS_POINTS, "11" if name.startswith("int8") else "-"))
    return out


def describe_checkpoint(ckpt: Path) -> str:
    """The checkpoint in words, without its folder's path: a Trainer's ``OUT/final`` names its steps
    (from ``OUT/log.jsonl``)."""
    import json

    log = ckpt.parent / "log.jsonl"
    if ckpt.name == "final" and log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        if lines:
            return f"`{ckpt.parent.name}` checkpoint given, trained {json.loads(lines[-1])['step']} steps"
    return f"checkpoint `{ckpt.name}` given"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="trained float checkpoint (train_synthetic --save-dir DIR: "
                                                      "DIR/divided); default: train one here")
    p.add_argument("--train-steps", type=int, default=600, help="steps when training the checkpoint here")
    p.add_argument("--qat-steps", type=int, default=300, help="QAT steps (0: post-training int8 only)")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--clips-per-class", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=None, help=WORK_HELP)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="int8_accuracy", help="results name under bench/results")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    with work_folder(args.work, "ernie_int8_accuracy-") as work:
        args.work = str(work)
        run(args)


def run(args: argparse.Namespace) -> None:
    """Every row, its verdicts and the results file; ``args.work`` is the folder to work in."""
    from ernie_vl.app.hub import load_model
    from ernie_vl.model import ErnieVL
    from ernie_vl.quantize import int8_kernel_choice, quantize_int8
    from ernie_vl.train.evaluation import evaluate
    from ernie_vl.quantize_aware import strip_qat
    from ernie_vl.train.qat import QATConfig, finetune_int8, held_out_sources, qat_trainer
    from train_synthetic import make_data

    load_before = os.getloadavg()[0]
    command = command_line("int8_accuracy.py")
    data, _ = make_data(Path(args.work) / "data", False, args.clips_per_class)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        model_text = describe_checkpoint(ckpt)
    else:
        ckpt = train_checkpoint(data, args)
        model_text = f"`tiny` trained here {args.train_steps} steps"
        seconds["train"] = time.perf_counter() - t0
    fp32 = load_model(str(ckpt), precision="fp32").model
    val_pairs, val_videos = held_out_sources(fp32, str(data["heldout"]), str(data["val_videos"]))
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        rows["fp32"] = evaluate(fp32, val_pairs, val_videos)
        saved = Path(args.work) / "int8_ptq"
        ptq = quantize_int8(fp32)
        grids = sorted({m.grid for m in ptq.modules() if hasattr(m, "grid")})
        ptq.save_pretrained(str(saved))
        rows["int8 PTQ"] = evaluate(ErnieVL.from_pretrained(str(saved)).eval(), val_pairs, val_videos)
        rows["int8 PTQ (serve --precision int8)"] = evaluate(load_model(str(ckpt), precision="int8").model,
                                                             val_pairs, val_videos)
        rows["bf16"] = evaluate(in_bf16(load_model(str(ckpt), precision="bf16").model), val_pairs, val_videos)
    seconds["evaluations"] = time.perf_counter() - t0
    qat_text = "not run"
    if args.qat_steps:
        t0 = time.perf_counter()
        trainer = qat_trainer(QATConfig(checkpoint=str(ckpt), out=str(Path(args.work) / "qat"), steps=args.qat_steps,
                                        pairs=[str(data["pairs"])], videos=[str(data["videos"])], lr=args.qat_lr,
                                        threads=args.threads, progress=not args.no_progress))
        int8_qat, result = finetune_int8(trainer)
        with torch.no_grad():
            rows[f"int8 QAT {args.qat_steps} steps"] = evaluate(int8_qat, val_pairs, val_videos)
            # the same fine-tuned weights in float: what the extra steps alone did (reported, no goal)
            rows[FLOAT_AFTER_QAT] = evaluate(strip_qat(trainer.model).eval(), val_pairs, val_videos)
        seconds["QAT"] = time.perf_counter() - t0
        qat_text = (f"{result.steps} steps of fake-quant fine-tuning at peak lr {args.qat_lr:g} (cosine, 10 warm-up "
                    "steps), batches of 64 pairs + 32 clips, then `quantize_int8`")
    info = {"model": model_text, "qat": qat_text, "kernel": int8_kernel_choice(), "seconds": seconds,
            "grid": ", ".join(f"{g.bit_length()} bits" for g in grids)}
    facts = machine(load_before)
    text = markdown(rows, info, command, facts)
    write_results(args.out, text, verdicts(rows, model_text), facts, command)
    print(text)


if __name__ == "__main__":
    main()
