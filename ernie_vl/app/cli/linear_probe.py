"""``ernie-vl linear-probe MODEL TRAIN TEST``: logistic regression on frozen image features (L-BFGS in torch,
weight decay chosen on a validation split of TRAIN), top-1 on TEST; the probe is saved for ``ernie-vl classify``.

``--features embedding`` (default, as CLIP_benchmark) probes the normalised image embedding; ``pooled`` the
features before the projection (as the CLIP paper); ``tokens`` the mean of the image encoder's patch tokens;
``layers`` the mean tokens of every layer of the image path, concatenated (the last three: ErnieVL models;
see ``ernie_vl.app.image_features``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from ernie_vl.app.cli.eval_zeroshot import add_image_data_options, print_summary, write_classification_report
from ernie_vl.app.image_features import FEATURE_KINDS


def linear_probe(model_spec: str, train: str | Path, test: str | Path, labels_file: Optional[str | Path] = None,
                 batch_size: int = 64, workers: int = 2, progress: bool = True, seed: int = 0,
                 loaded: Any = None, features: str = "embedding") -> tuple[dict[str, Any], Any, Any]:
    """(metrics on TEST incl. ``confusion``, the fitted probe, (test features, logits, classes))."""
    from ernie_vl.app.hub import load_model
    from ernie_vl.app.image_features import ImageFeatures
    from retrieval.classify import LabelledImages, classification_metrics, embed_labelled
    from retrieval.probe import fit_linear_probe
    from video.cli_support import read_labels

    loaded = loaded or load_model(model_spec)
    model = ImageFeatures(loaded.model, features)
    classes = read_labels(Path(labels_file)) if labels_file else None
    train_images = LabelledImages.load(train, classes)
    test_images = LabelledImages.load(test, train_images.classes)
    fit = embed_labelled(model, train_images, loaded.preprocess, batch_size, workers, progress, model.normalized)
    probe = fit_linear_probe(fit.embeddings, fit.labels, train_images.classes, seed=seed, model_id=loaded.model_id,
                             feature_kind=features)
    held = embed_labelled(model, test_images, loaded.preprocess, batch_size, workers, progress, model.normalized)
    logits = probe.logits(held.embeddings)
    metrics = classification_metrics(logits, held.labels, test_images.classes)
    metrics.update(model=loaded.model_id, features=features, weight_decay=probe.weight_decay, val_top1=probe.val_top1,
                   num_train=len(fit.labels), train_failures=len(fit.failures), classes=test_images.classes)
    return metrics, probe, (held, logits, test_images.classes)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    metrics, probe, (held, logits, classes) = linear_probe(args.model, args.train, args.test, args.labels,
                                                           args.batch_size, args.workers, not args.no_progress,
                                                           args.seed, features=args.features)
    probe.save(args.out / "probe")
    report = write_classification_report(args.out, metrics, classes, held.paths, held.labels, logits, held.failures)
    print_summary(report, args.out, args.json)
    if not args.json:
        print(f"probe: {args.out / 'probe'} (weight decay {probe.weight_decay:g}, validation top-1 "
              f"{100 * probe.val_top1:.2f}%)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("linear-probe", help="linear probe on frozen image embeddings: fit on TRAIN, "
                              "top-1 on TEST", description=__doc__)
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("train", type=Path, help="ROOT/<class>/<image> folder or path,label CSV to fit on")
    p.add_argument("test", type=Path, help="ROOT/<class>/<image> folder or path,label CSV to measure on")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--features", choices=FEATURE_KINDS, default="embedding",
                   help="image features to probe: the normalised embedding (default, as CLIP_benchmark); "
                   "'pooled', before the projection (as the CLIP paper); 'tokens', the image encoder's mean patch "
                   "token; 'layers', the mean tokens of the encoder, projector and every backbone block, "
                   "concatenated (best when training had few distinct captions); the last three: ErnieVL models")
    add_image_data_options(p, "runs/linear-probe", "class names, one per line (default: TRAIN's labels, sorted); "
                           "the probe is saved in OUT/probe")
    p.set_defaults(func=run)
