"""Validation runs for ``bench/train_digits.py``: settings are chosen here, never on its held-out 25%.

The bench's training digits (75% of scikit-learn's 1,797, the same ``make_digits`` split) are split
again 80/20 (stratified, seed 0). ``tiny`` trains on the 80% with the given settings; zero-shot
top-1 and linear-probe top-1 (``--features layers`` and ``embedding``, the probe fitted on the 80%)
are measured on the 20%, which the encoder never saw, next to LogisticRegression on the same pixels.
For ``layers`` the probe is also fitted at each fixed weight decay, to show how much its own choice
(made on a split of images the encoder trained on) costs. Each run appends one JSON line to
``--log`` (``bench/results/digits_validation_rows.jsonl``) and prints it; ``--table`` writes the
table of every logged run, grouped by setting with the mean and spread over seeds, to
``bench/results/digits_validation.md``. Runs logged before ``--caption-positives`` existed trained with plain
CLIP pairs (every other row a negative, even one with the same caption) and are grouped as such. A fixed
step budget, so the figures do not depend on the load.

    .venv/bin/python bench/digits_validation.py --steps 2000 --seed 1
    .venv/bin/python bench/digits_validation.py --steps 2000 --ema 0.998
    .venv/bin/python bench/digits_validation.py --steps 2000 --caption-positives   # identical captions as positives
    .venv/bin/python bench/digits_validation.py --steps 2000 --contrastive siglip
    .venv/bin/python bench/digits_validation.py --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (the script's folder), whose encoders.py would shadow the package

from _report import Verdict, command_line, machine, write_results

CACHE = ROOT / ".cache" / "bench_digits_val"
ROWS = ROOT / "bench" / "results" / "digits_validation_rows.jsonl"
SETTING = ("steps", "image_stem", "lr", "warmup", "min_lr_ratio", "ema", "crop", "rotate", "contrastive",
           "caption_positives", "other_changes")
# rows logged before these settings existed were trained with plain CLIP pairs and tiny's preset as it was
# and tiny's linear image embedding (rows logged before the run recorded its image tokenizer, ``image_stem``)
OLD = {"contrastive": "clip", "caption_positives": False, "image_stem": "linear"}
SIGLIP = {"contrastive": "siglip", "init_logit_scale": 10.0, "init_logit_bias": -10.0}  # SigLIP's initialisation
FIXED_DECAYS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed (the splits stay fixed)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: the bench's)")
    p.add_argument("--min-lr-ratio", type=float, default=None, help="cosine floor (default: the trainer's)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the weights (default: off)")
    p.add_argument("--image-crop-min-area", type=float, default=0.85)
    p.add_argument("--image-rotate", type=float, default=5.0)
    p.add_argument("--contrastive", choices=("clip", "siglip"), default="clip",
                   help="the pair loss (siglip: with SigLIP's initial scale 10 and bias -10)")
    p.add_argument("--caption-positives", action=argparse.BooleanOptionalAction, default=False,
                   help="identical captions in a batch are positives of each other (an opt-in of the toolkit); "
                        "default / --no-caption-positives: plain pairs, every other row a negative")
    p.add_argument("--override", type=json.loads, default=None, metavar="JSON",
                   help="changes to tiny's preset, as `ernie-vl train --model-overrides` takes them, e.g. "
                        "'{\"image_encoder\": {\"conv_stem\": [16, 32, 64]}}' (default: the preset as it is)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the training process (default: the trainer's choice); pass it when "
                        "two runs share the machine, or they oversubscribe it")
    p.add_argument("--log", type=Path, default=ROWS)
    p.add_argument("--table", action="store_true", help="write the table of the logged runs; no training")
    args = p.parse_args()
    if args.table:
        write_table(args.log)
        return

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from ernie_vl.app.image_features import ImageFeatures
    from ernie_vl.data.digits import CAPTION, make_digits
    from ernie_vl.model import ErnieVL
    from ernie_vl.train import TrainConfig, train
    from retrieval.classify import LabelledImages, embed_labelled, zero_shot_logits
    from retrieval.probe import fit_linear_probe

    load_before = os.getloadavg()[0]
    start = time.time()
    data = make_digits(CACHE / "digits", seed=0)  # the bench's split (its seed 0)
    rows = data.csv["train"].read_text().splitlines()[1:]
    labelled = data.labels_csv["train"].read_text().splitlines()[1:]
    fit_rows, val_rows = train_test_split(np.arange(len(rows)), test_size=0.2, random_state=0,
                                          stratify=data.labels["train"])
    files = {}
    for name, index in (("fit", np.sort(fit_rows)), ("val", np.sort(val_rows))):
        files[name] = data.root / f"val_{name}.csv"
        files[name].write_text("filepath,caption\n" + "\n".join(rows[i] for i in index) + "\n")
        files[name + "_labels"] = data.root / f"val_{name}_labels.csv"
        files[name + "_labels"].write_text("path,label\n" + "\n".join(labelled[i] for i in index) + "\n")
    overrides = dict(args.override or {})
    if args.contrastive == "siglip":
        overrides["loss"] = {**overrides.get("loss", {}), **SIGLIP}
    tag = (f"s{args.steps}-seed{args.seed}-w{args.warmup}-m{args.min_lr_ratio}-e{args.ema}"
           f"-c{int(args.caption_positives)}-{args.contrastive}"
           + (f"-o{hashlib.sha1(json.dumps(args.override, sort_keys=True).encode()).hexdigest()[:8]}"
              if args.override else ""))
    extra = {k: v for k, v in (("min_lr_ratio", args.min_lr_ratio), ("ema", args.ema)) if v is not None}
    result = train(TrainConfig(out=str(CACHE / f"run-{tag}"), model="tiny", pairs=[str(files["fit"])],
                               batch_pairs=args.batch, max_steps=args.steps, lr=args.lr,
                               warmup_steps=args.warmup if args.warmup is not None else min(50, args.steps // 10 + 1),
                               num_workers=args.workers, progress=False, seed=args.seed, decode_cache=None,
                               image_crop_min_area=args.image_crop_min_area, image_rotate=args.image_rotate,
                               caption_positives=args.caption_positives,
                               threads=args.threads, model_overrides=overrides, **extra))
    model = ErnieVL.from_pretrained(result.final_dir).eval()
    classes = [str(d) for d in range(10)]
    fit, val = (LabelledImages.load(files[k], classes) for k in ("fit_labels", "val_labels"))
    with torch.inference_mode():
        val_emb = embed_labelled(model, val, model.preprocess, progress=False)
        logits = zero_shot_logits(model, model.tokenizer, val_emb.embeddings, classes, [CAPTION.replace("{}", "{label}")])
    record = {"steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
              "min_lr_ratio": args.min_lr_ratio, "ema": args.ema, "crop": args.image_crop_min_area,
              "rotate": args.image_rotate, "caption_positives": args.caption_positives,
              "contrastive": overrides.get("loss", {}).get("contrastive", args.contrastive),
              "overrides": json.dumps(args.override, sort_keys=True) if args.override else None,
              "image_stem": image_stem_name(getattr(model.cfg.image_encoder.conv_stem, "channels", 0)),
              "zero_shot": float((logits.argmax(1) == val_emb.labels).double().mean())}
    for kind in ("layers", "embedding"):
        features = ImageFeatures(model, kind)
        with torch.inference_mode():
            fx = embed_labelled(features, fit, model.preprocess, progress=False, normalize=features.normalized)
            vx = embed_labelled(features, val, model.preprocess, progress=False, normalize=features.normalized)
        probe = fit_linear_probe(fx.embeddings, fx.labels, classes, seed=0, feature_kind=kind)
        record[kind] = float((probe.logits(vx.embeddings).argmax(1) == vx.labels).double().mean())
        record[kind + "_wd"] = probe.weight_decay
        if kind == "layers":
            for wd in FIXED_DECAYS:
                fixed = fit_linear_probe(fx.embeddings, fx.labels, classes, weight_decays=[wd], seed=0, feature_kind=kind)
                record[f"layers_wd{wd:g}"] = float((fixed.logits(vx.embeddings).argmax(1) == vx.labels).double().mean())
    pix_fit, pix_val = data.pixels["train"][fit_rows], data.pixels["train"][val_rows]
    lab_fit, lab_val = data.labels["train"][fit_rows], data.labels["train"][val_rows]
    record["pixels_logreg"] = float(LogisticRegression(max_iter=5000).fit(pix_fit, lab_fit).score(pix_val, lab_val))
    record["n_val"] = len(val_rows)
    record["last_loss"] = result.last_losses.get("loss", float("nan"))
    record["seconds"] = round(time.time() - start)
    record["load"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    print(json.dumps(record))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _setting(run: dict) -> tuple:
    """A row's values of ``SETTING``. Settings a row logged before they were recorded ran with: the defaults
    of then (``OLD``), and the image tokenizer its ``--override`` asked for, else tiny's linear embedding of
    then. ``other_changes``: the row's ``--override`` without the image tokenizer (a JSON string, or None)."""
    overrides = json.loads(run.get("overrides") or "{}")
    image = dict(overrides.get("image_encoder", {}))
    stem = image.pop("conv_stem", None)
    others = {k: v for k, v in overrides.items() if k != "image_encoder"}
    others.update({f"image_encoder.{k}": v for k, v in image.items()})
    values = {"other_changes": json.dumps(others, sort_keys=True) if others else None,
              "image_stem": run.get("image_stem", image_stem_name(stem) if stem is not None else OLD["image_stem"])}
    return tuple(values[k] if k in values else run.get(k, OLD.get(k)) for k in SETTING)


def image_stem_name(conv_stem) -> str:
    """How the table names an image tokenizer: ``linear`` (``conv_stem`` 0) or ``conv [16, 32, 64]``."""
    if not conv_stem:
        return "linear"
    channels = conv_stem["channels"] if isinstance(conv_stem, dict) else conv_stem
    return f"conv {list(channels)}"


def _spread(values: list[float]) -> str:
    """``mean`` for one value, ``mean ± sd (min-max)`` for several."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def write_table(log: Path, results_dir: Path | None = None) -> str:
    """Group the logged runs by setting; write ``digits_validation.md`` and its JSON under ``results_dir``
    (default bench/results); returns the markdown. Settings run with >= 3 seeds get a summary row."""
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(_setting(run), []).append(run)
    n_val = runs[0]["n_val"]
    rows = [("| steps | image tokens | other changes to `tiny` | augmentation | schedule | EMA | loss, same-caption pairs | seeds | zero-shot "
             "| probe, `layers` (its own weight decay) "
             "| probe, `layers`, weight decay 0.1 | probe, `embedding` | LogisticRegression, raw pixels |"),
            "|---:|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    import statistics

    reference = max(groups.values(), key=len)  # the setting run with the most seeds measures the seed noise
    ref_mean = statistics.mean(r["layers"] for r in reference)
    ref_sd = statistics.stdev([r["layers"] for r in reference]) if len(reference) > 1 else float("nan")
    rows[0] += " `layers` minus the most-seeded setting's mean, in its seed sd |"
    rows[1] += "---:|"
    verdicts = []
    for key, group in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        setting = dict(zip(SETTING, key))
        seeds = ", ".join(str(r["seed"]) for r in group)
        cols = [_spread([r[c] for r in group]) for c in ("zero_shot", "layers", "layers_wd0.1", "embedding", "pixels_logreg")]
        schedule = (f"warm-up {setting['warmup'] if setting['warmup'] is not None else 'default'}, cosine floor "
                    f"{setting['min_lr_ratio'] if setting['min_lr_ratio'] is not None else 'default'}")
        pairs = (f"{setting['contrastive']}, " + ("positives" if setting["caption_positives"] else "negatives"))
        preset = f"`{setting['other_changes']}`" if setting["other_changes"] else "none"
        augment = ("none" if setting["crop"] >= 1 and not setting["rotate"]
                   else f"crops {setting['crop']:g}-1, rotations {setting['rotate']:g} degrees")
        rows.append(f"| {setting['steps']} | {setting['image_stem']} | {preset} | {augment} | {schedule} | {setting['ema'] or 'off'} | {pairs} | {seeds} | "
                    + " | ".join(cols)
                    + (f" | {(statistics.mean(r['layers'] for r in group) - ref_mean) / ref_sd:+.1f} |" if ref_sd > 0
                       else " | n/a |"))
        if len(group) >= 3:
            verdicts.append(Verdict(f"digits validation ({n_val} training digits the encoder never saw): `layers` probe, "
                                    f"{setting['steps']} steps, EMA {setting['ema'] or 'off'}, same-caption pairs "
                                    f"{pairs}, image tokens {setting['image_stem']}, other changes to tiny {preset}, seeds {seeds}", "report",
                                    f"{cols[1]} vs LogisticRegression {cols[4]}", None))
    first = runs[0]
    text = ("# Digits: validation runs (settings for `bench/train_digits.py` are chosen here)\n\n"
            f"Command: `{command_line('digits_validation.py')}` (each row: `digits_validation.py --steps N --seed S "
            "[--ema D] [--contrastive siglip] [--caption-positives] [--override JSON]`; every run is a line of "
            "`bench/results/digits_validation_rows.jsonl`)\n\n"
            f"The bench's 1,347 training digits split 80/20 (stratified, seed 0): `tiny` trains on the 80% "
            f"(batch {first.get('batch', 64)}, lr {first['lr']:g}, the row's image tokens and augmentation; "
            "`linear` is tiny's image patch embedding before the conv tokenizer became its default), "
            f"every figure is top-1 on the other {n_val} digits, "
            "which the encoder never saw (one digit = "
            f"{100 / n_val:.2f} points); the probes are fitted on the 80%. The bench's held-out 450 digits are not "
            "used. Fixed step budgets: the load (each run's before/after 1-min load average: "
            + ", ".join(f"{r['load'][0]}/{r['load'][1]}" for r in runs) + ") changes the time only. "
            "Same-caption pairs: `negatives` is plain CLIP / SigLIP pairs, `positives` makes identical captions "
            "in a batch positives of each other (`--caption-positives`, an opt-in of the toolkit). For CLIP's "
            "InfoNCE the two give the same loss and gradients, up to rounding, when the copies of a caption "
            "embed alike, as in `tiny` (no dropout or router noise on the text side): their rows differ only as "
            "far as rounding makes two runs drift apart. For SigLIP they are different losses (SigLIP rows start "
            f"from its paper's scale {SIGLIP['init_logit_scale']:g} and bias {SIGLIP['init_logit_bias']:g}).\n\n"
            + "\n".join(rows) + "\n")
    print(text)
    write_results("digits_validation", text, verdicts, machine(), command_line("digits_validation.py"), results_dir)
    return text


if __name__ == "__main__":
    main()
