"""Load a model for search / serving from a spec: an ErnieVL checkpoint folder or ``open_clip:ARCH[:WEIGHTS]``.

``open_clip:ViT-B-32`` is random init (seeded, so the same spec gives the same weights in every
process); ``open_clip:ViT-B-32:laion2b_s34b_b79k`` a pretrained tag (needs the open_clip cache or
network); ``open_clip:ViT-B-32:/path/weights.pt`` a local file; ``open_clip:local-dir:/path`` an
open_clip folder (``open_clip_config.json`` and optional weights).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

OPEN_CLIP_PREFIX = "open_clip:"
RANDOM_INIT_SEED = 0


@dataclass
class LoadedModel:
    """A model with ``encode_image`` / ``encode_text``, its image transform, tokenizer and id."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    model_id: str

    @property
    def embedding_dim(self) -> int:
        """D of the model's embeddings (one dummy text through the text tower)."""
        with torch.inference_mode():
            device = next(self.model.parameters()).device
            return int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])


def _load_open_clip(rest: str, device: str) -> LoadedModel:
    import open_clip

    if rest.startswith(("local-dir:", "hf-hub:")):
        arch, weights = rest, None
    else:
        arch, _, weights = rest.partition(":")
        weights = weights or None
    if not arch:
        raise ValueError(f"model spec {OPEN_CLIP_PREFIX + rest!r} names no architecture; "
                         f"use open_clip:ARCH[:PRETRAINED_OR_PATH], e.g. open_clip:ViT-B-32")
    schema = arch.startswith(("local-dir:", "hf-hub:"))
    if not schema and arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if weights is not None and os.path.sep in weights and not Path(weights).is_file():
        raise ValueError(f"open_clip weights file {weights!r} does not exist")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    if arch.startswith("local-dir:"):
        model_id = OPEN_CLIP_PREFIX + "local-dir:" + str(Path(arch[len("local-dir:"):]).resolve())
    elif weights is None:
        model_id = f"{OPEN_CLIP_PREFIX}{arch}:random-init-seed{RANDOM_INIT_SEED}"
    elif Path(weights).is_file():
        model_id = f"{OPEN_CLIP_PREFIX}{arch}:{Path(weights).resolve()}"
    else:
        model_id = f"{OPEN_CLIP_PREFIX}{arch}:{weights}"
    return LoadedModel(model.eval(), preprocess, tokenizer, model_id)


def load_model(spec: str, device: str = "cpu", precision: str = "fp32") -> LoadedModel:
    """Resolve ``spec`` (checkpoint folder or ``open_clip:ARCH[:PRETRAINED_OR_PATH]``) to a LoadedModel
    prepared at ``precision`` ("fp32", "bf16" or "int8"; ``ernie_vl.precision.at_precision``)."""
    from ernie_vl.precision import at_precision, check_precision

    check_precision(precision)
    loaded = _load(spec, device)
    if precision != "fp32":
        loaded.model = at_precision(loaded.model, precision)
    return loaded


def _load(spec: str, device: str) -> LoadedModel:
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model spec must be a non-empty string, got {spec!r}")
    if spec.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(spec[len(OPEN_CLIP_PREFIX):], device)
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"model {spec!r} is neither a checkpoint folder (config.json + model.safetensors) "
                         f"nor an 'open_clip:ARCH[:PRETRAINED_OR_PATH]' spec")
    from ernie_vl.model import ErnieVL

    model = ErnieVL.from_pretrained(str(folder), map_location=device)
    model_id = getattr(model, "model_id", None) or f"ernie-vl:{folder.resolve()}"
    return LoadedModel(model.eval(), model.preprocess, model.tokenizer, model_id)


def download_reason(spec: str) -> Optional[str]:
    """Why loading ``spec`` could fetch files from the network, or None when it loads from local files only.

    An ErnieVL checkpoint folder, an open_clip architecture at random init, a local weights file or a
    ``local-dir:`` folder load locally (unless their text tower comes from the Hugging Face Hub);
    ``hf-hub:`` specs and pretrained tags are downloads.
    """
    if not isinstance(spec, str) or not spec.startswith(OPEN_CLIP_PREFIX):
        return None
    rest = spec[len(OPEN_CLIP_PREFIX):]
    if rest.startswith("hf-hub:"):
        return "an hf-hub: model is downloaded from the Hugging Face Hub"
    if rest.startswith("local-dir:"):
        import json

        try:
            config = json.loads((Path(rest[len("local-dir:"):]) / "open_clip_config.json").read_text())
        except (OSError, ValueError):
            return None  # load_model reports the broken folder
        model_cfg = config.get("model_cfg", {}) if isinstance(config, dict) else {}
    else:
        import open_clip

        arch, _, weights = rest.partition(":")
        if weights and not Path(weights).is_file():
            return f"the pretrained weights {weights!r} are downloaded (or read from a download cache)"
        model_cfg = open_clip.get_model_config(arch) or {}
    text_cfg = model_cfg.get("text_cfg", {}) if isinstance(model_cfg, dict) else {}
    hf_name = text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") if isinstance(text_cfg, dict) else None
    return f"its text tower {hf_name!r} comes from the Hugging Face Hub" if hf_name else None


def model_spec_for_manifest(spec: str) -> str:
    """The spec to record in an index: folders and weight files made absolute."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        rest = spec[len(OPEN_CLIP_PREFIX):]
        if rest.startswith("local-dir:"):
            return OPEN_CLIP_PREFIX + "local-dir:" + str(Path(rest[len("local-dir:"):]).resolve())
        arch, _, weights = rest.partition(":")
        if weights and Path(weights).is_file():
            return f"{OPEN_CLIP_PREFIX}{arch}:{Path(weights).resolve()}"
        return spec
    return str(Path(spec).resolve())


def optional_device(name: Optional[str]) -> str:
    """'cpu' unless a CUDA device is asked for and present."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return name or "cpu"
