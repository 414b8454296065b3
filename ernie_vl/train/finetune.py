"""Fine-tuning helpers: freezing, drop-path on the video encoder, a prompt-initialised head, a new head.

- :func:`freeze`: ``"backbone"`` trains only the video classifier (a linear probe on frozen
  features); ``"none"`` trains everything.
- :func:`add_drop_path`: stochastic depth on the residual branches (spatial attention and MLP)
  of the video encoder's blocks, rate rising linearly with depth to ``rate`` (timm's rule), as
  forward hooks (the weights and their names are unchanged; training mode only).
- :func:`init_head_from_prompts`: the classifier's rows set to the class prompts' text
  embeddings, scaled so that its logits start as the zero-shot classifier's (logit scale x cosine)
  at the clips' mean embedding norm.
- :func:`replace_head`: a fresh classifier for new class names (e.g. a model trained on pairs only).
- :func:`trained_on`: what a checkpoint was trained on (pairs, videos, open_clip), from its weights' header.
- :func:`video_start`: whether a loaded checkpoint's video path is inflated from its image path, or kept and why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

FREEZE_MODES = ("none", "backbone")
# how a fine-tuned checkpoint's video path starts (setup.json's ``video_init``)
INFLATED = "inflated from the image encoder"
KEPT = "kept from the checkpoint"
KEPT_STEM = ("kept: the video encoder has a conv stem, which auto does not inflate (--video-init image "
             "inflates it from an image encoder with its own conv tokenizer)")
# how a linear probe's classifier starts (setup.json's ``head_init``)
HEAD_FROM_PROMPTS = "from the class prompts' text embeddings (starts as the zero-shot classifier)"
HEAD_RANDOM = ("random: the classifier reads the video encoder's pooled features (head.video_cls_input="
               "'encoder'), not the space of the class prompts' text embeddings")
HEAD_STREAMED = "as the model had it: the clips are streamed, none cached to start it from the class prompts"


def freeze(model: nn.Module, mode: str) -> int:
    """Apply ``mode``; returns the number of trainable parameters left."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"unknown freeze mode {mode!r}; valid: {list(FREEZE_MODES)}")
    if mode == "backbone":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _drop_hook(rate: float):
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if not module.training or rate <= 0:
            return out
        keep = 1.0 - rate
        mask = torch.empty((out.shape[0],) + (1,) * (out.dim() - 1), device=out.device, dtype=out.dtype)
        return out * mask.bernoulli_(keep).div_(keep)
    return hook


def add_drop_path(encoder: nn.Module, rate: float) -> list:
    """Stochastic depth on ``encoder.blocks[i].ls1`` / ``ls2`` outputs (per clip); returns the hook handles."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {rate!r}")
    handles = []
    blocks = list(getattr(encoder, "blocks", []))
    for i, block in enumerate(blocks):
        block_rate = rate * i / max(len(blocks) - 1, 1)
        if block_rate > 0:
            handles += [block.ls1.register_forward_hook(_drop_hook(block_rate)),
                        block.ls2.register_forward_hook(_drop_hook(block_rate))]
    return handles


@torch.no_grad()
def init_head_from_prompts(model: Any, prompt_tokens: Sequence[torch.Tensor], clips: torch.Tensor) -> bool:
    """Classifier rows := normalised class text embeddings x (logit scale / mean clip embedding norm).

    Returns False (the classifier left as it is) when the classifier reads the video encoder's pooled
    features (``head.video_cls_input="encoder"``): text embeddings live in the other space."""
    from encoders.prompts import ensemble_token_embeddings

    if model.cfg.head.video_cls_input != "embed":
        return False
    was = model.training
    model.eval()
    text = ensemble_token_embeddings(model.encode_text, prompt_tokens)  # (C, E), unit rows (prompt ensembling)
    norm = model.video_features(clips, routing=False).embeds.float().norm(dim=-1).mean().clamp_min(1e-6)
    model.train(was)
    model.classifier.weight.copy_(text * (model.logits.scale().float() / norm))
    model.classifier.bias.zero_()
    return True


def replace_head(model: Any, class_names: Sequence[str]) -> None:
    """A freshly initialised classifier for ``class_names`` (config and ``model.class_names`` follow)."""
    names = [str(c) for c in class_names]
    old = model.classifier
    model.classifier = nn.Linear(old.in_features, len(names)).to(old.weight.device, old.weight.dtype)
    model.cfg.class_names, model.cfg.num_classes = list(names), len(names)
    model.class_names = list(names)


def trained_on(checkpoint_dir: str | Path) -> set[str]:
    """What a checkpoint was trained on, from its weights file's metadata: {"pairs", "videos", "open_clip"}."""
    from ernie_vl import checkpoint

    try:
        meta = checkpoint.read_header(Path(checkpoint_dir) / checkpoint.WEIGHTS_NAME).get("__metadata__") or {}
    except (OSError, ValueError):
        return set()
    return {k for k in str(meta.get("trained_on", "")).split(",") if k}


def has_video_stem(model_cfg) -> bool:
    """Whether the video encoder of ``model_cfg`` (an ``ErnieVLConfig``) has a conv stem (``video_start``'s
    ``video_stem``): a one-layer stem, a tokenizer, or frame differences."""
    return bool(model_cfg.video_encoder.conv_stem)


def video_start(video_init: str, has_videos: bool, checkpoint_trained_on: set[str], video_stem: bool) -> str:
    """:data:`INFLATED`, or why the checkpoint's video path is kept (:data:`KEPT`, :data:`KEPT_STEM`).

    ``"image"`` always inflates (``inflate_video_from_image`` refuses what cannot be inflated with a
    ValueError saying why); ``"keep"`` never does; ``"auto"`` inflates a checkpoint trained on pairs but
    never on videos when videos are trained on, unless its video encoder has a conv stem (``video_stem``).
    Such a stem is kept even where an image tokenizer could inflate it. Inflation (``TrainConfig.video_diff_init``,
    ``"pixels"`` by default) starts the stem's frame-difference inputs at the pixels' weights and temporal
    attention at zero; on the few-shot motion clips a pair-trained ``tiny`` fine-tuned from its own (untrained)
    frame-difference tokenizer reached the same supervised top-1 as that inflated start within the run-to-run
    spread (each start ahead on some seeds), at a lower cost per step (the inflated encoder takes the image's
    4 px patches: four times the tokens); from the zero start (``video_diff_init="zero"``) the inflated stem is blind to motion and failed to fit the clips. The few-shot
    bench's ``pairs_keep`` / ``pairs_image`` / ``pairs_image_zero`` rows check this on several seeds."""
    if video_init == "image":
        return INFLATED
    if video_init == "keep" or not has_videos:
        return KEPT
    if "pairs" not in checkpoint_trained_on or "videos" in checkpoint_trained_on:
        return KEPT
    return KEPT_STEM if video_stem else INFLATED
