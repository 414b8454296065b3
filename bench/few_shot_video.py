"""Actions from few labelled clips: `tiny` trained on 40 (and 512) clips per class of a motion set drawn
by a generator unlike the demo's (``bench/_motion_clips.py``: 16 frames at 64x64, other shapes, sizes,
speeds and backgrounds, a static distractor object).

Rows (``--rows``, each ``CLIPS:VARIANT:SEED``). The issue's rows (``full`` and its ablations) are relative to
``tiny``'s defaults; every other variant names its video encoder explicitly, so its meaning survives a change of
the preset:

- ``full``: ``ernie-vl train --videos --recipe auto`` with ``tiny`` as it is (its default video encoder: the
  conv tokenizer fed frame differences): the few-shot recipe and the label maps of the data's ``augment.json``
  (flip and reversal partners). The verdict rows;
- ``noaug``: ``full`` without any clip augmentation (no flips, reversals, temporal or frame-rate jitter, random
  resized crops, mixing): what clip augmentation buys;
- ``space_only``: ``full`` with a frame-wise transformer (no temporal attention, no time embedding, 1-frame
  tubelets), the default stem kept: its 3x3x3 blocks and frame differences still see neighbouring frames, so
  this row measures what temporal attention and tubelets buy on top of the stem's local motion features;
- ``space_only_static``: ``space_only`` with a stem that sees one frame at a time (the default stem's channels,
  ``frame_diff`` off, ``time_kernel`` 1): no token sees a second frame and the shared class token averages the
  frames' updates, so the model cannot tell the frame order: what modelling time buys at all;
- ``nostem`` / ``nostem_noaug`` / ``space_only_nostem``: ``full`` / ``noaug`` / ``space_only`` with the video
  encoder without a stem (``conv_stem=0``, tiny's default before the tokenizer became it);
- ``stem``: ``full`` with a one-layer convolutional stem (``conv_stem=24``: a 3x3x3 convolution and a GELU
  before the patch embedding);
- ``tokenizer``: ``full`` with the conv tokenizer on pixels only (``conv_stem=[16, 32, 64]``: three 3x3x3 Conv3d
  + BatchNorm + GELU blocks, strided in space and time, then a 1x1x1 projection); ``tokenizer_noaug``: the same
  with ``noaug``'s settings; ``tokenizer_diff``: ``full`` with the tokenizer fed frame differences too
  (``conv_stem={"channels": [16, 32, 64], "frame_diff": true}``, what ``full`` ran when it became the default);
- ``tokenizer_diff_12`` / ``tokenizer_diff_8``: ``full`` with narrower frame-difference tokenizers (channels
  [12, 24, 48] / [8, 16, 32]; ``bench/video_stem_cost.py`` times their steps): whether a cheaper stem is as accurate;
- ``pairs_keep`` / ``pairs_image``: ``full`` (same clips, recipe, steps, evaluation) started not from the preset
  at random init but from a ``tiny`` checkpoint trained on image-text pairs only (``bench/_pair_start.py``:
  ``--pair-steps`` steps on synthetic captioned shapes with the row's seed, cached in the work folder so both
  rows of a seed share it), fine-tuned with ``--video-init keep`` (the checkpoint's own, untrained video
  encoder) or ``--video-init image`` (the video encoder inflated from the trained image encoder, through its
  conv tokenizer, in the image encoder's geometry, its frame-difference inputs started at the pixels'
  weights: ``--video-diff-init pixels``, the default, as TSN starts its RGB-difference network from the RGB one;
  a still clip is unchanged). ``--video-init auto`` keeps a video encoder with a conv stem, as ``tiny``'s is, so
  it runs ``pairs_keep`` (no row of its own). Each row records its start (``start``: the pair stage's steps,
  seed, seconds and retrieval; how the video path started and, inflated, where its frame differences started);
  ``pairs_image_zero``: ``pairs_image`` with ``--video-diff-init zero`` (the frame-difference inputs start at
  zero, blind to motion: what ``--video-init image`` did before ``pixels`` became its default; the rows run then
  as ``pairs_image`` are renamed to it);
  ``pairs_image_diff``: the start ``pairs_image`` takes now, built by the bench before the trainer offered it
  (``inflate_video_from_image(diff_init="pixels")`` saved beside the pair checkpoint, then fine-tuned with
  ``--video-init keep``): the same start weights as ``pairs_image`` reached in another order, so its random
  draws differ; kept buildable so its rows stay reproducible, not run again;
- ``c3d``: the reference learner of ``bench/_reference_c3d.py`` (a 3D convnet of about 70k
  parameters, the same clips, frames, size and label-aware flips / reversals, Adam, ``--steps``
  steps, 600 without): what is reachable on these clips with so few labels;
- ``vit_ref`` / ``vit_ref_stem`` / ``vit_ref_tokenizer`` / ``vit_ref_tokenizer_diff``: ``tiny``'s bare video
  encoder (without a stem, with the one-layer conv stem, with the conv tokenizer, with the tokenizer fed frame
  differences) and a linear head in that same loop (AdamW 1e-3): whether the encoder itself or the rest of the
  training (projector, MoE backbone, losses, schedule) is what fails to learn from few clips. The encoder's
  own goal: ``vit_ref_tokenizer_diff`` >= 0.93 on two seeds at 40 clips per class.

``auto``'s rule for a pair-trained ``tiny`` (keep its video stem rather than inflate it) is checked against the
``pairs_*`` rows: ``pairs_keep`` above ``pairs_image`` on every seed with both rows (at least two) at 40 clips per class (``pairs_image_zero``
and ``pairs_image_diff`` are reported beside it, in no verdict).

Each row records the video encoder it ran (attention, tubelet size, stem; since the ``pairs_*`` rows also
patch size and class-token mode) and its seconds per step (the training loop's wall clock over its steps). A row whose recorded encoder is
no longer what its variant builds (after a change of ``tiny``'s defaults) is marked stale in the table and
left out of the verdicts; rows run under a name whose meaning later changed were renamed to the variant that
builds what they ran (``relabelled_from`` and ``note`` in the row), and the table's notes list them.

Every row trains for ``--minutes`` of wall clock and / or ``--steps`` optimiser steps (the issue's
budget is 10 minutes on 2 cores; on a shared machine a step budget keeps rows comparable), then
reports supervised and zero-shot top-1 on 32 held-out clips per class. Rows accumulate in
``bench/results/few_shot_video_rows.json`` (a rerun of a row replaces it), and the tables and the
verdicts (>= 0.90 on both seeds at 40 clips per class, >= 0.97 at 512) are computed from all rows
(``--rows ''`` rewrites them from the rows file without training).

    .venv/bin/python bench/few_shot_video.py --rows 40:full:0,40:full:1 --minutes 10 --steps 600
    .venv/bin/python bench/few_shot_video.py --rows 40:pairs_keep:0,40:pairs_image:0 --steps 600 --minutes 0 \
        --pair-steps 400 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _motion_clips import VERSION, make_clips  # noqa: E402
from _pair_start import inflated_checkpoint, pair_checkpoint  # noqa: E402
from _report import Verdict, command_line, machine, write_results  # noqa: E402

NAME = "few_shot_video"
ROWS_FILE = Path(__file__).resolve().parent / "results" / f"{NAME}_rows.json"
AUTO = dict(recipe="auto")
NO_AUG = dict(recipe="auto", p_hflip=0.0, p_reverse=0.0, temporal_jitter=False, speed_min=1.0, crop_min_area=1.0,
              mixup=0.0, cutmix=0.0)
FRAME_WISE = {"attention": "space_only", "tubelet_size": 1}  # no temporal attention, 1-frame tubelets
NO_STEM = {"conv_stem": 0}
TOKENIZER_DIFF = {"channels": [16, 32, 64], "frame_diff": True}
VARIANTS = {  # model overrides of tiny (merged into the preset), trainer settings; None: not the ernie-vl trainer
    "full": ({}, AUTO),
    "noaug": ({}, NO_AUG),
    "space_only": ({"video_encoder": FRAME_WISE}, AUTO),
    # merged into the default stem: its channels, no frame differences, 1x3x3 kernels
    "space_only_static": ({"video_encoder": {**FRAME_WISE, "conv_stem": {"frame_diff": False, "time_kernel": 1}}},
                          AUTO),
    "nostem": ({"video_encoder": NO_STEM}, AUTO),
    "nostem_noaug": ({"video_encoder": NO_STEM}, NO_AUG),
    "space_only_nostem": ({"video_encoder": {**FRAME_WISE, **NO_STEM}}, AUTO),
    "stem": ({"video_encoder": {"conv_stem": 24}}, AUTO),
    "tokenizer": ({"video_encoder": {"conv_stem": [16, 32, 64]}}, AUTO),  # a list replaces the default's dict
    "tokenizer_noaug": ({"video_encoder": {"conv_stem": [16, 32, 64]}}, NO_AUG),
    "tokenizer_diff": ({"video_encoder": {"conv_stem": {**TOKENIZER_DIFF, "time_kernel": 3}}}, AUTO),
    # narrower tokenizers fed frame differences (bench/video_stem_cost.py times them): cheaper if as accurate
    "tokenizer_diff_12": ({"video_encoder": {"conv_stem": {"channels": [12, 24, 48], "frame_diff": True}}}, AUTO),
    "tokenizer_diff_8": ({"video_encoder": {"conv_stem": {"channels": [8, 16, 32], "frame_diff": True}}}, AUTO),
    # from tiny trained on pairs only (bench/_pair_start.py); auto keeps tiny's video stem, as keep does
    "pairs_keep": ({}, dict(AUTO, video_init="keep")),
    "pairs_image": ({}, dict(AUTO, video_init="image")),  # frame differences from the pixels' (the default)
    "pairs_image_zero": ({}, dict(AUTO, video_init="image", video_diff_init="zero")),
    # inflated by the bench (PRE_INFLATED), then kept: frame differences start at the pixels' weights
    "pairs_image_diff": ({}, dict(AUTO, video_init="keep")),
    "c3d": None,  # the reference learner (bench/_reference_c3d.py), not ernie-vl
    "vit_ref": None,  # tiny's bare video encoder + a linear head in the reference's loop
    "vit_ref_stem": None,  # the same with conv_stem=24
    "vit_ref_tokenizer": None,  # the same with the conv tokenizer conv_stem=[16, 32, 64]
    "vit_ref_tokenizer_diff": None,  # the same with the tokenizer fed frame differences
}
REFERENCES = {"c3d": None, "vit_ref": NO_STEM, "vit_ref_stem": {"conv_stem": 24},
              "vit_ref_tokenizer": {"conv_stem": [16, 32, 64]},
              "vit_ref_tokenizer_diff": {"conv_stem": TOKENIZER_DIFF}}  # video encoder fields replacing tiny's
REFERENCE_LOOP = {"vit_ref_tokenizer_diff": {"weight_decay": 0.05}}  # AdamW settings other than lr 1e-3, wd 1e-2
ENCODER_GOAL = ("vit_ref_tokenizer_diff", 40, 0.93)  # the bare encoder's goal: this row, clips/class, top-1 on 2 seeds
GOALS = {40: 0.90, 512: 0.97}
PAIR_VARIANTS = ("pairs_keep", "pairs_image", "pairs_image_zero", "pairs_image_diff")  # from the pair stage
PRE_INFLATED = {"pairs_image_diff": "pixels"}  # inflated before fine-tuning, with this diff_init
RULE_CLIPS = 40  # clips/class at which the pairs rows check auto's rule


def parse_rows(text: str) -> list[tuple[int, str, int]]:
    rows = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) != 3 or parts[1] not in VARIANTS or not parts[0].isdigit() or not parts[2].isdigit():
            raise ValueError(f"row {item!r} is not CLIPS:VARIANT:SEED with VARIANT in {list(VARIANTS)}")
        rows.append((int(parts[0]), parts[1], int(parts[2])))
    return rows


def encoder_summary(cfg) -> dict:
    """What a row's video encoder is (an ``encoders.video_vit.VideoEncoderConfig`` -> plain dict): attention,
    tubelet size, stem (0, the one-conv stem's channels, or the tokenizer's fields), patch size and class-token
    mode (rows written before the ``pairs_*`` rows recorded only the first three)."""
    stem = cfg.conv_stem
    if dataclasses.is_dataclass(stem):
        stem = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(stem).items()}
    patch = cfg.patch_size
    return {"attention": cfg.attention, "tubelet_size": cfg.tubelet_size, "conv_stem": stem,
            "patch_size": list(patch) if isinstance(patch, (tuple, list)) else [patch, patch], "cls_mode": cfg.cls_mode}


def reference_video_cfg(variant: str) -> dict | None:
    """The bare encoder's fields of a reference row (tiny's video encoder with the row's fields replaced)."""
    from ernie_vl.presets import preset_dict

    overrides = REFERENCES[variant]
    return None if overrides is None else {**preset_dict("tiny")["video_encoder"], **overrides}


def expected_encoder(variant: str) -> dict | None:
    """The video encoder ``variant`` builds now (None for the 3D-convnet reference); ``--video-init image``
    rows: what inflating ``tiny``'s image encoder gives."""
    return copy.deepcopy(_expected_encoder(variant))


@functools.lru_cache(maxsize=None)
def _expected_encoder(variant: str) -> dict | None:
    from encoders.video_vit import VideoEncoderConfig
    from ernie_vl.presets import load_config

    if variant in REFERENCES:
        video_cfg = reference_video_cfg(variant)
        return None if video_cfg is None else encoder_summary(VideoEncoderConfig(**video_cfg))
    overrides, extra = VARIANTS[variant]
    if extra.get("video_init") == "image" or variant in PRE_INFLATED:
        import ernie_vl
        from ernie_vl.inflate import inflate_video_from_image

        return encoder_summary(inflate_video_from_image(ernie_vl.create_model("tiny", **overrides)).cfg.video_encoder)
    return encoder_summary(load_config("tiny", **overrides).video_encoder)


def is_stale(row: dict) -> bool:
    """A row that recorded its video encoder and ran another than its variant builds now (a preset change),
    compared on the fields the row recorded."""
    if "video_encoder" not in row:
        return False
    recorded, expected = row["video_encoder"], expected_encoder(row["variant"])
    if recorded is None or expected is None:
        return recorded != expected
    return recorded != {k: expected.get(k) for k in recorded}


def describe_encoder(enc: dict | None) -> str:
    """A table cell: ``divided, k=4, tokenizer [16, 32, 64] + diff``; ``-`` where the row did not record it."""
    if not enc:
        return "-"
    stem = enc["conv_stem"]
    if isinstance(stem, dict):
        text = f"tokenizer {stem['channels']}" + (" + diff" if stem["frame_diff"] else "")
        text += "" if stem.get("time_kernel", 3) == 3 else f", time kernel {stem['time_kernel']}"
    else:
        text = f"one-conv stem {stem}" if stem else "no stem"
    patch = enc.get("patch_size")  # recorded since the pairs rows
    space = "" if patch is None else f", p={patch[0]}" if patch[0] == patch[1] else f", p={patch[0]}x{patch[1]}"
    cls = "" if enc.get("cls_mode") is None else f", cls {enc['cls_mode'].replace('_', ' ')}"
    return f"{enc['attention']}, k={enc['tubelet_size']}{space}, {text}{cls}"


def run_reference(clips: int, variant: str, seed: int, data: dict, args) -> dict:
    from _reference_c3d import train_reference

    load0, t0 = os.getloadavg()[0], time.perf_counter()
    from encoders.video_vit import VideoEncoderConfig

    overrides, video_cfg = REFERENCES[variant], reference_video_cfg(variant)
    loop = {"lr": 3e-3 if video_cfg is None else 1e-3, "weight_decay": 1e-2, **REFERENCE_LOOP.get(variant, {})}
    ref = train_reference(data["train"], data["val"], steps=args.steps or 600, seed=seed, video_cfg=video_cfg, **loop)
    return {"clips": clips, "variant": variant, "seed": seed, "steps": ref["steps"], "train_s": ref["train_s"],
            "total_s": round(time.perf_counter() - t0, 1), "top1": ref["top1"], "zeroshot_top1": None,
            "budget": {"minutes": None, "steps": ref["steps"]},
            "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "setup": {"reference": (f"TinyC3D, {ref['params']} parameters" if video_cfg is None else
                                    f"tiny's video encoder {overrides} + linear head, {ref['params']} parameters")
                      + f", AdamW lr {loop['lr']:g} weight decay {loop['weight_decay']:g} one-cycle, batch 32, "
                        "plain cross-entropy"},
            "video_encoder": None if video_cfg is None else encoder_summary(VideoEncoderConfig(**video_cfg)),
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_row(clips: int, variant: str, seed: int, args) -> dict:
    from ernie_vl.train import TrainConfig
    from ernie_vl.train.trainer import Trainer

    data = make_clips(Path(args.work) / f"data_{clips}_v{VERSION}", clips)
    if variant in REFERENCES:
        return run_reference(clips, variant, seed, data, args)
    overrides, extra = VARIANTS[variant]
    out = Path(args.work) / f"{clips}_{variant}_{seed}"
    model, pair_stage = "tiny", None
    if variant in PAIR_VARIANTS:  # the checkpoint carries its own config: no overrides
        checkpoint, pair_stage = pair_checkpoint(Path(args.work), args.pair_steps, seed, args.threads,
                                                 not args.no_progress)
        if variant in PRE_INFLATED:
            checkpoint = inflated_checkpoint(checkpoint, PRE_INFLATED[variant])
        model = str(checkpoint)
    kw = dict(out=str(out), model=model, model_overrides=overrides, videos=[str(data["train"])],
              val_videos=str(data["val"]), minutes=args.minutes, max_steps=args.steps, seed=seed,
              batch_videos=args.batch_videos, num_workers=1, progress=not args.no_progress, threads=args.threads,
              decode_cache=None)
    kw.update(extra)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    trainer = Trainer(TrainConfig(**kw))
    result = trainer.run()
    setup = json.loads((out / "setup.json").read_text())
    cfg = trainer.model.cfg
    start = {"from": "tiny at random init"} if pair_stage is None else {
        "from": f"tiny trained {pair_stage['steps']} steps on image-text pairs only (seed {pair_stage['seed']})",
        "pair_stage": pair_stage, "video_init": setup["video_init"],
        **({"video_diff_init": setup["video_diff_init"]} if "video_diff_init" in setup else {}),
        "video_projector": {"kind": cfg.video_projector.kind, "num_queries": cfg.video_projector.num_queries}}
    if variant in PRE_INFLATED:
        start["inflated"] = f"by the bench before fine-tuning: inflate_video_from_image(diff_init={PRE_INFLATED[variant]!r})"
    return {"clips": clips, "variant": variant, "seed": seed, "steps": result.steps, "start": start,
            "train_s": round(result.seconds, 1), "total_s": round(time.perf_counter() - t0, 1),
            "top1": result.evaluation.get("video_top1"), "zeroshot_top1": result.evaluation.get("video_zeroshot_top1"),
            "budget": {"minutes": args.minutes, "steps": args.steps}, "load": [round(load0, 2),
                                                                                round(os.getloadavg()[0], 2)],
            "setup": setup, "video_encoder": encoder_summary(trainer.model.cfg.video_encoder),
            "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def verdicts(rows: list[dict]) -> list[Verdict]:
    rows = [r for r in rows if not is_stale(r)]
    out = []
    for clips, goal in GOALS.items():
        full = sorted((r for r in rows if r["clips"] == clips and r["variant"] == "full"), key=lambda r: r["seed"])
        seeds = {r["seed"]: r for r in full}
        if not seeds:
            out.append(Verdict(f"supervised top-1, {clips} clips/class, two seeds", f">= {goal:.2f} on both",
                               "not run", False))  # a goal nobody measured is not met
            continue
        measured = ", ".join(f"seed {s}: {r['top1']:.3f} ({r['steps']} steps)" for s, r in sorted(seeds.items()))
        met = len(seeds) >= 2 and all(r["top1"] >= goal for r in seeds.values())
        if len(seeds) < 2:
            measured += " (one seed only)"
        out.append(Verdict(f"supervised top-1, {clips} clips/class, two seeds", f">= {goal:.2f} on both", measured,
                           met))
    names = {"c3d": "reference 3D convnet (~70k parameters)", "vit_ref": "tiny's bare video encoder + linear head",
             "vit_ref_stem": "tiny's bare video encoder with conv stem + linear head",
             "vit_ref_tokenizer": "tiny's bare video encoder with conv tokenizer + linear head",
             "vit_ref_tokenizer_diff": "tiny's bare video encoder with frame-diff conv tokenizer + linear head"}
    for variant, label in names.items():
        for clips in sorted({r["clips"] for r in rows if r["variant"] == variant}):
            ref = sorted((r for r in rows if r["clips"] == clips and r["variant"] == variant), key=lambda r: r["seed"])
            measured = ", ".join(f"seed {r['seed']}: {r['top1']:.3f} ({r['steps']} steps)" for r in ref)
            if (variant, clips) == ENCODER_GOAL[:2]:
                goal = ENCODER_GOAL[2]
                met = len({r["seed"] for r in ref}) >= 2 and all(r["top1"] >= goal for r in ref)
                out.append(Verdict(f"{label}, top-1, {clips} clips/class, two seeds", f">= {goal:.2f} on both",
                                   measured + ("" if len(ref) >= 2 else " (one seed only)"), met))
            else:
                out.append(Verdict(f"{label}, top-1, {clips} clips/class", "report", measured, None))
    rule = auto_rule_verdict(rows)
    for variant, label in REPORTED_STARTS.items():
        runs = sorted((r for r in rows if r["clips"] == RULE_CLIPS and r["variant"] == variant),
                      key=lambda r: r["seed"])
        if runs:
            out.append(Verdict(f"from a pair-trained tiny, {label}, top-1, {RULE_CLIPS} clips/class", "report",
                               ", ".join(f"seed {r['seed']}: {r['top1']:.3f} ({r['steps']} steps)" for r in runs),
                               None))
    return out + ([] if rule is None else [rule])


#: inflated starts reported beside the auto rule's verdict (in none): variant -> what its start is
REPORTED_STARTS = {
    "pairs_image_zero": "--video-init image with frame differences started at zero (--video-diff-init zero)",
    "pairs_image_diff": "the video path inflated by the bench with frame differences started at the pixels' "
                        "weights (pairs_image's start, other random draws)",
}


def auto_rule_verdict(rows: list[dict]) -> Verdict | None:
    """Whether ``--video-init auto``'s rule holds: from a pair-trained ``tiny``, ``pairs_keep`` above
    ``pairs_image`` on every seed that has both rows (at least two), each seed compared at equal step budgets (fine-tuning and pair stage);
    None when no ``pairs_*`` row exists."""
    by = {v: {r["seed"]: r for r in rows if r["clips"] == RULE_CLIPS and r["variant"] == v} for v in PAIR_VARIANTS}
    if not any(by.values()):
        return None
    keep, image = by["pairs_keep"], by["pairs_image"]

    def budget(r: dict) -> tuple:
        return r.get("budget", {}).get("steps"), r.get("start", {}).get("pair_stage", {}).get("steps")

    seeds = sorted(s for s in set(keep) & set(image) if budget(keep[s]) == budget(image[s]))
    measured = "; ".join(f"seed {s}: keep {keep[s]['top1']:.3f}, image {image[s]['top1']:.3f} "
                         f"({keep[s]['steps']} / {image[s]['steps']} steps)" for s in seeds) or "no seed has both rows"
    if len(seeds) < 2:
        measured += " (fewer than two seeds with both rows at one budget)"
    met = len(seeds) >= 2 and all(keep[s]["top1"] > image[s]["top1"] for s in seeds)
    return Verdict(f"--video-init auto keeps tiny's video stem: from a pair-trained tiny, keep above image, top-1, "
                   f"{RULE_CLIPS} clips/class, every seed with both rows", "keep > image on each of >= 2 seeds",
                   measured, met)


LEGEND = {  # the table's notes, one per variant (the module docstring says the same at length)
    "full": "`ernie-vl train --videos --recipe auto` with tiny's defaults (recipe + the data's augment.json)",
    "noaug": "`full` without clip augmentation",
    "space_only": "`full` with a frame-wise transformer (no temporal attention, 1-frame tubelets), the default "
                  "stem kept (its 3x3x3 blocks and frame differences still see neighbouring frames)",
    "space_only_static": "`space_only` with a stem that sees one frame at a time (no frame differences, time "
                         "kernel 1): no temporal information at all",
    "nostem": "`full` with the stem-less video encoder (`conv_stem=0`)",
    "nostem_noaug": "`noaug` with the stem-less video encoder",
    "space_only_nostem": "`space_only` with the stem-less video encoder",
    "stem": "`full` with a one-conv stem (`conv_stem=24`)",
    "tokenizer": "`full` with the conv tokenizer on pixels (`conv_stem=[16, 32, 64]`)",
    "tokenizer_noaug": "`tokenizer` without clip augmentation",
    "tokenizer_diff": "`full` with the conv tokenizer fed frame differences too (`frame_diff`)",
    "tokenizer_diff_12": "`full` with a narrower frame-difference tokenizer, channels [12, 24, 48]",
    "tokenizer_diff_8": "`full` with a narrower frame-difference tokenizer, channels [8, 16, 32]",
    "pairs_keep": "`full` from tiny trained on image-text pairs only (the pair stage's steps and seed in the start "
                  "column), `--video-init keep`: its own, untrained video encoder (what `auto` does with tiny)",
    "pairs_image": "`pairs_keep` with `--video-init image`: the video encoder inflated from the trained image "
                   "encoder and its conv tokenizer, in the image encoder's geometry (4 px patches, per-frame class "
                   "tokens), its projector a copy of the image projector, its frame-difference inputs' weights "
                   "started at the pixels' (`--video-diff-init pixels`, the default: TSN's start of its "
                   "RGB-difference network; still clips unchanged)",
    "pairs_image_zero": "`pairs_image` with `--video-diff-init zero`: the frame-difference inputs' weights start "
                        "at zero (blind to motion), what `--video-init image` did before `pixels` became its default",
    "pairs_image_diff": "`pairs_image`'s start built by the bench before the trainer offered it "
                        "(`inflate_video_from_image(diff_init='pixels')`, saved, then fine-tuned with `keep`): the "
                        "same start weights, other random draws; not run again",
    "c3d": "the ~70k-parameter 3D-convnet reference on the same clips",
    "vit_ref": "tiny's bare video encoder without a stem and a linear head in the reference's loop",
    "vit_ref_stem": "the same with the one-conv stem",
    "vit_ref_tokenizer": "the same with the conv tokenizer",
    "vit_ref_tokenizer_diff": "the same with the conv tokenizer fed frame differences",
}


def describe_start(row: dict) -> str:
    """A table cell: ``random init``, or the pair stage's steps and how the video path started."""
    start = row.get("start") or {}
    if "pair_stage" not in start:
        return "random init"
    diffs = diff_start(row)
    how = "video kept" if diffs is None else f"inflated from image, diffs from {diffs}"
    return f"pairs {start['pair_stage']['steps']} steps, {how}"


def diff_start(row: dict) -> str | None:
    """Where an inflated row's frame-difference weights started (``"pixels"`` / ``"zero"``), None for a kept
    video path: the bench's own inflation (``PRE_INFLATED``), else the trainer's as the row recorded it; a
    trainer-inflated row that recorded none ran before ``--video-diff-init`` existed, when the start was zero."""
    start = row.get("start") or {}
    if "inflated" in start:
        return PRE_INFLATED[row["variant"]]
    if not start.get("video_init", "").startswith("inflated"):
        return None
    return start.get("video_diff_init", "zero")


def relabel_notes(rows: list[dict]) -> list[str]:
    """One line per row renamed after its variant's meaning changed (its ``relabelled_from`` and ``note``)."""
    return [f"- `{r['clips']}:{r['variant']}:{r['seed']}` (written {r['written']}) ran as `{r['relabelled_from']}`: "
            f"{r['note']}" for r in rows if r.get("relabelled_from")]


def markdown(rows: list[dict], command: str, facts) -> str:
    lines = ["# Few-shot video: `tiny` on a second motion generator", "", f"`{command}` (latest invocation; rows "
             "accumulate across invocations, each with its own budget and load)", "", facts.line(), "",
             "| clips/class | variant | video encoder | seed | steps | train s | s / step | start | budget (min / steps) "
             "| load before / after | top-1 | zero-shot top-1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["clips"], list(VARIANTS).index(r["variant"]), r["seed"])):
        b = r["budget"]
        name = r["variant"] + (" (stale: ran another encoder)" if is_stale(r) else "")
        lines.append(f"| {r['clips']} | {name} | {describe_encoder(r.get('video_encoder'))} | {r['seed']} | "
                     f"{r['steps']} | {r['train_s']} | {r['train_s'] / max(r['steps'], 1):.3f} | {describe_start(r)} | "
                     f"{'-' if b['minutes'] is None else b['minutes']} / {b['steps']} | "
                     f"{r['load'][0]} / {r['load'][1]} | {r['top1']:.3f} | "
                     f"{'-' if r['zeroshot_top1'] is None else format(r['zeroshot_top1'], '.3f')} |")
    shown = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines += ["", f"Clips: `bench/_motion_clips.py` drawing version {VERSION}. Held-out: 32 clips per class "
              "(8 classes, chance 0.125). References (`c3d`, `vit_ref*`) have no zero-shot. Video encoder: attention, "
              "tubelet size k, patch size p, stem, class tokens (`-`: a row from before rows recorded it; p and "
              "class tokens recorded since the `pairs_*` rows). A stale row recorded an encoder "
              "other than its variant builds now and counts in no verdict. The machine is shared: wall-clock "
              "budgets are not comparable between rows with different loads; step budgets are, and so are seconds per "
              "step only between rows run at similar loads. Start: `random init` is the preset (every row before "
              "the `pairs_*` rows); `pairs N steps` a checkpoint trained N steps on image-text pairs only "
              "(`bench/_pair_start.py`).", ""]
    lines += [f"- `{v}`: {LEGEND[v]}" for v in shown]
    notes = relabel_notes(rows)
    if notes:
        lines += ["", "Renamed rows (the variant they ran under later came to mean another encoder or start):", "", *notes]
    setups = {f"{r['clips']}:{r['variant']}": r["setup"] for r in rows}
    lines += ["", "What each setting chose (setup.json of its latest row):", "", "```",
              json.dumps(setups, indent=1)[:4000], "```"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="40:full:0,40:full:1,40:noaug:0,40:space_only:0,40:space_only_static:0,"
                                     "512:full:0,512:full:1")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="wall-clock budget per row; 0: none (with --steps, a fixed step budget whatever the load)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--pair-steps", type=int, default=400,
                   help="optimiser steps of the pair stage the pairs_* rows start from (cached per steps and seed)")
    p.add_argument("--batch-videos", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/bench_few_shot")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    todo = parse_rows(args.rows)
    if args.minutes is not None and args.minutes <= 0:
        if not args.steps:
            p.error("--minutes 0 (no wall-clock budget) needs --steps")
        args.minutes = None
    load0 = os.getloadavg()[0]
    rows = json.loads(ROWS_FILE.read_text()) if ROWS_FILE.is_file() else []
    for clips, variant, seed in todo:
        row = run_row(clips, variant, seed, args)
        row["generator"] = VERSION
        print(json.dumps({k: v for k, v in row.items() if k != "setup"}), flush=True)
        rows = [r for r in rows if (r["clips"], r["variant"], r["seed"]) != (clips, variant, seed)] + [row]
        ROWS_FILE.parent.mkdir(parents=True, exist_ok=True)
        ROWS_FILE.write_text(json.dumps(rows, indent=1) + "\n")  # each finished row is kept at once
    facts = machine(load0)
    command = command_line("few_shot_video.py")
    if args.work != p.get_default("work"):  # the scratch folder is this machine's business, not the result's
        command = command.replace(args.work, "WORK")
    vs = verdicts(rows)
    for v in vs:
        print(f"{v.what}: {v.measured} -> goal {v.goal}: {'reported' if v.met is None else 'met' if v.met else 'not met'}")
    write_results(NAME, markdown(rows, command, facts), vs, facts, command)


if __name__ == "__main__":
    main()
