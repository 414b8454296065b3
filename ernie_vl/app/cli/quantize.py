"""``ernie-vl quantize MODEL --out DIR``: the int8 checkpoint of a float one, optionally after QAT.

Without ``--qat-steps`` this is post-training int8 (``ernie_vl.quantize_int8``). With
``--qat-steps N`` and training data (``--pairs`` / ``--videos``, as for ``ernie-vl train``), the
model is first fine-tuned N steps with fake-quant linear layers (``ernie_vl.quantize_aware``), then
converted to the same int8 model. With held-out data (``--val-pairs`` / ``--val-videos``) it prints
the held-out metrics of fp32, post-training int8 and (with QAT) QAT int8. The int8 folder loads
with ``ErnieVL.from_pretrained`` and serves with ``ernie-vl serve DIR``.

QAT shows a progress bar and saves its state (``--checkpoint-minutes``, ``--checkpoint-every``) in
``--work`` (default ``OUT.qat``, removed once the int8 checkpoint is written); after an interruption
the same command with ``--resume`` continues from the last saved step to the weights an unbroken
run gives, and refuses a saved run of another model or other settings.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

#: what a QAT run writes in its work folder (a default work folder holding only these is removed at the end)
QAT_WORK_FILES = {"log.jsonl", "setup.json", "eval.json", "train_state.safetensors", "final"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write the int8 checkpoint of a model (post-training, or after quantization-aware fine-tuning)",
        description="Quantize an ErnieVL checkpoint to int8 (per-channel int8 weights, 7-bit per-tensor "
                    "activations) and save it. --qat-steps N first fine-tunes N steps with fake-quant layers "
                    "on --pairs / --videos (recommended where post-training int8 loses accuracy).",
    )
    p.add_argument("model", help="float ErnieVL checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--out", type=Path, required=True, help="folder for the int8 checkpoint")
    p.add_argument("--qat-steps", type=int, default=0, help="quantization-aware fine-tuning steps (0: post-training)")
    p.add_argument("--pairs", nargs="*", default=[], help="image-text CSVs for QAT (filepath,caption)")
    p.add_argument("--videos", nargs="*", default=[], help="video class folders for QAT")
    p.add_argument("--val-pairs", default=None, help="held-out image-text CSV: print Recall@K of each model")
    p.add_argument("--val-videos", default=None, help="held-out video class folder: print top-1/top-5 of each model")
    p.add_argument("--lr", type=float, default=1e-4, help="QAT peak learning rate (default 1e-4)")
    p.add_argument("--batch-pairs", type=int, default=64)
    p.add_argument("--batch-videos", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=1, help="data decoding processes for QAT (default 1)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the QAT run's log and resumable state (default: OUT.qat, removed at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue the QAT run saved in --work (same model and settings) from its last saved step")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save the QAT state every N minutes (default 5; 0: off; always saved at the end)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save the QAT state every N steps (0: off)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ernie_vl.model import ErnieVL
    from ernie_vl.quantize import quantization_scheme, quantize_int8, state_dict_bytes
    from ernie_vl.train.evaluation import evaluate

    if args.qat_steps < 0:
        raise ValueError(f"--qat-steps must be >= 0, got {args.qat_steps}")
    if args.qat_steps and not (args.pairs or args.videos):
        raise ValueError("--qat-steps needs training data: --pairs CSV ... and/or --videos FOLDER ...")
    if args.resume and not args.qat_steps:
        raise ValueError("--resume continues an interrupted QAT run: give the same --qat-steps N and data as that run")
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{args.model!r} is not an ErnieVL checkpoint folder (config.json + model.safetensors)")
    model = ErnieVL.from_pretrained(str(folder)).eval()
    if quantization_scheme(model) is not None:
        raise ValueError(f"{args.model!r} is already an int8 checkpoint")
    report: dict = {"model": str(folder), "out": str(args.out), "qat_steps": args.qat_steps}
    val_pairs = val_videos = None
    if args.qat_steps:
        from ernie_vl.train.qat import QATConfig, finetune_int8, qat_trainer

        work = args.work or Path(str(args.out.resolve()) + ".qat")
        cfg = QATConfig(checkpoint=str(folder), out=str(work), steps=args.qat_steps, pairs=args.pairs,
                        videos=args.videos, val_pairs=args.val_pairs, val_videos=args.val_videos, lr=args.lr,
                        batch_pairs=args.batch_pairs, batch_videos=args.batch_videos, threads=args.threads,
                        seed=args.seed, num_workers=args.num_workers, progress=not args.no_progress,
                        checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                        resume=args.resume)
        trainer = qat_trainer(cfg)
        start_step = trainer.step
        val_pairs, val_videos = trainer.val_pairs, trainer.val_videos
        try:
            int8, result = finetune_int8(trainer)
        except KeyboardInterrupt:
            print(f"\ninterrupted; {_resume_hint(work)}", file=sys.stderr)
            return 130
        report["qat"] = {"steps": result.steps, "resumed_at_step": start_step, "seconds": round(result.seconds, 1),
                         "lr": args.lr, "work": str(work)}
    else:
        int8 = quantize_int8(model)
        if args.val_pairs or args.val_videos:
            from ernie_vl.train.qat import held_out_sources

            val_pairs, val_videos = held_out_sources(model, args.val_pairs, args.val_videos, not args.no_progress)
    if val_pairs is not None or val_videos is not None:
        with torch.no_grad():
            report["fp32"] = evaluate(model, val_pairs, val_videos)
            if args.qat_steps:
                report["int8_post_training"] = evaluate(quantize_int8(model), val_pairs, val_videos)
            report["int8"] = evaluate(int8, val_pairs, val_videos)
    int8.save_pretrained(str(args.out))
    if args.qat_steps and args.work is None and _only_qat_files(work):
        shutil.rmtree(work)  # the int8 checkpoint is written: the default work folder has done its job
        report["qat"]["work"] = None
    report["bytes_fp32"], report["bytes_int8"] = state_dict_bytes(model), state_dict_bytes(int8)
    print(json.dumps(report, indent=1))
    return 0



def _resume_hint(work: Path) -> str:
    """What an interrupted QAT run left in ``work`` and how to continue it."""
    from ernie_vl.train import checkpointing as ckpt

    if not ckpt.has_training_state(work):
        return f"no QAT state was saved in {str(work)!r} yet (see --checkpoint-minutes / --checkpoint-every)"
    step = ckpt.read_state_entry(work, "step")
    return (f"the QAT state of step {step} is saved in {str(work)!r}: run the same command with --resume "
            f"to continue from it")


def _only_qat_files(work: Path) -> bool:
    """True when ``work`` holds nothing but what a QAT run writes (never remove a user's files)."""
    return work.is_dir() and all(p.name in QAT_WORK_FILES or p.name.startswith(".") and ".tmp-" in p.name
                                 for p in work.iterdir())
