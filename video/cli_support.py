"""Helpers of the `ernie-vl classify` and `eval-video` commands (model -> clip transform, labels, zero-shot); no ernie_vl import."""
from __future__ import annotations

import argparse
from pathlib import Path

from video.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipTransform, build_clip_transform
from video.zeroshot import DEFAULT_TEMPLATES, ZeroShotClassifier, as_video_text_model


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", type=Path, default=None,
                   help="text file with one class name per line (default: the model's class names)")
    p.add_argument("--zero-shot", action="store_true",
                   help="classify by cosine between the video and prompts built from the class names")
    p.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                   help="zero-shot prompt templates with {label} (default: %s)" % "; ".join(DEFAULT_TEMPLATES))
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="zero-shot: JSON {class name: [prompt, ...]}; each class's embedding is the mean of its "
                        "prompts' (CLIP prompt ensembling); classes not in the file use the templates")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's, else 8)")
    p.add_argument("--sampling", choices=("tsn", "uniform", "dense"), default="tsn",
                   help="frame sampling (default: tsn segment centres)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed to decode one video (default 30)")
    p.add_argument("--device", default=None, help="torch device (default: the model's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} does not exist")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"labels file {str(path)!r} has no class names")
    return names


def model_frames(model, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--frames must be >= 1, got {requested}")
        return requested
    encoder_cfg = getattr(getattr(model, "cfg", None), "video_encoder", None)
    return int(getattr(encoder_cfg, "num_frames", 8) or 8)


def clip_transform_for(loaded) -> ClipTransform:
    """Eval clip transform with the model's image size, mean and std (open_clip models: from ``visual``)."""
    pre = loaded.preprocess
    size = getattr(pre, "image_size", None)
    if size is None:
        size = getattr(getattr(loaded.model, "visual", None), "image_size", 224)
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    mean = tuple(getattr(pre, "mean", OPENAI_CLIP_MEAN))
    std = tuple(getattr(pre, "std", OPENAI_CLIP_STD))
    return build_clip_transform(train=False, image_size=int(size), mean=mean, std=std)


def prompt_name(name: str) -> str:
    """Folder-style class names read better in prompts: "playing_guitar" -> "playing guitar"."""
    return name.replace("_", " ").strip()


def read_class_prompts(path: Path) -> dict[str, list[str]]:
    """A JSON file {class name: [prompt, ...]} (CLIP-style prompt ensembles) for zero-shot."""
    import json

    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"prompts file {str(path)!r} must hold a JSON object class name -> list of prompts")
    return data


def build_classifier(loaded, class_names: list[str], zero_shot: bool, templates: list[str] | None,
                     class_prompts: dict[str, list[str]] | None = None):
    """The model to call ``classify_video`` on: the model itself, or a zero-shot wrapper.

    ``class_prompts`` (keys: the class names as given) replace the templates for those classes.
    """
    if not zero_shot:
        if not callable(getattr(loaded.model, "classify_video", None)):
            raise ValueError(f"model {loaded.model_id!r} has no classification head; use --zero-shot")
        return loaded.model
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.model_id!r} has no tokenizer; zero-shot needs one")
    unknown = sorted(set(class_prompts or {}) - set(class_names))
    if unknown:
        raise ValueError(f"prompts given for classes {unknown[:5]} that are not among the classes: {class_names[:10]}")
    prompts = {prompt_name(n): list(p) if not isinstance(p, str) else [p] for n, p in (class_prompts or {}).items()}
    return ZeroShotClassifier(as_video_text_model(loaded.model), loaded.tokenizer,
                              [prompt_name(n) for n in class_names], templates=templates or DEFAULT_TEMPLATES,
                              class_prompts=prompts)
