"""Typed configuration of the :class:`ernie_vl.model.ErnieVL` model.

``ErnieVLConfig`` nests one dataclass per part: the image and video encoders
(``encoders.vit.ImageEncoderConfig`` / ``encoders.video_vit.VideoEncoderConfig``),
the text embedding, one alignment projector per visual modality, the shared MoE
backbone (``ernie_vl.backbone.BackboneConfig``), the embedding heads and the losses.
``ErnieVLConfig.from_dict`` builds it from plain JSON data and fails on any unknown key,
naming it and the valid ones.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from encoders.video_vit import VideoEncoderConfig
from encoders.vit import ImageEncoderConfig
from ernie_vl.backbone import BackboneConfig
from ernie_vl.limits import check_field_bounds, check_field_type, validate_config
from ernie_vl.checks import check_choice

PROJECTOR_KINDS = ("linear", "mlp", "resampler", "resampler_ernie45")
PROJECTOR_TOKENS = ("all", "prefix")
VIDEO_CLS_INPUTS = ("embed", "encoder")
VISUAL_POOLS = ("cls", "mean")
CONTRASTIVE_KINDS = ("clip", "siglip")
OPEN_CLIP_VOCAB_SIZE = 49408


def _check_positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value <= 0:
            raise ValueError(f"{type(owner).__name__}.{name} must be > 0, got {value}")


# --------------------------------------------------------------------------- sections


@dataclass
class TextConfig:
    """Text input: token embedding + learned positions (``encoders.text.TextEmbedding``).

    vocab_size: 49408 is open_clip's BPE vocabulary. A smaller value (the ``test``
        preset) makes ``model.tokenizer`` fold the BPE ids into ``vocab_size`` ids
        (ordinary tokens ``id % (vocab_size - 2)``, start/end of text the two highest
        ids), so the end-of-text token keeps the largest id and CLIP's argmax pooling
        still finds it.
    context_length: tokens per caption; longer input is truncated by the tokenizer
        (ending with end-of-text) and refused by ``encode_text``.
    """

    vocab_size: int = OPEN_CLIP_VOCAB_SIZE
    context_length: int = 77

    def __post_init__(self) -> None:
        _check_positive(self, "context_length")
        if not 3 <= self.vocab_size <= OPEN_CLIP_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be in [3, {OPEN_CLIP_VOCAB_SIZE}], got {self.vocab_size}")


@dataclass
class ProjectorConfig:
    """Alignment projector from encoder width to backbone width (``ernie_vl.heads``).

    kind: ``linear`` | ``mlp`` (Linear-GELU-Linear) | ``resampler`` (``num_queries``
        learned queries cross-attend to all visual tokens, ``depth`` layers; turns a
        video's T x N tokens into M tokens) | ``resampler_ernie45`` (ERNIE 4.5 VL's
        variable-resolution resampler: 2 x 2 spatial and frame-pair merges, MLPs, linear,
        RMSNorm; needs ``tokens="all"`` and an even patch grid).
    mlp_ratio: hidden width of the ``mlp`` projector and of the resampler's MLPs, as a
        multiple of the backbone width.
    tokens: ``all`` (every encoder token enters the backbone) or ``prefix`` (only the class
        token(s): 1 per image, T per clip in ``per_frame`` mode) — a much cheaper visual path
        through the backbone, at the price of visual self-attention there.
    """

    kind: str = "linear"
    tokens: str = "all"
    mlp_ratio: float = 2.0
    num_queries: int = 32
    num_heads: int = 8
    depth: int = 1

    def __post_init__(self) -> None:
        check_choice("projector kind", self.kind, PROJECTOR_KINDS)
        check_choice("projector tokens", self.tokens, PROJECTOR_TOKENS)
        _check_positive(self, "mlp_ratio", "num_queries", "num_heads", "depth")


@dataclass
class HeadConfig:
    """Pooling + embedding heads (``ernie_vl.heads``).

    embed_dim: size E of the shared embedding space.
    visual_pool: ``cls`` (mean of the class / query tokens: the one class token of an
        image, the T per-frame class tokens of a video, the M resampler queries) or
        ``mean`` (mean of all visual tokens). Text always pools the end-of-text token.
    text_norm / visual_norm: LayerNorm before the projection. ``from_open_clip`` keeps
        CLIP's ``ln_final`` for text and turns the visual norm off (CLIP's visual norm
        is the encoder's ``ln_post``, applied before the projector).
    video_cls_input: what ``classify_video``'s linear classifier reads: ``embed`` (the video
        embedding after projector, backbone and visual head; a classifier that prompt text
        embeddings can initialise) or ``encoder`` (the video encoder's pooled features, as the
        cls heads of timm / mmaction2 read their backbone: on few labelled clips it fits as fast
        as the bare encoder, where ``embed`` fits several times slower).
    """

    embed_dim: int = 512
    visual_pool: str = "cls"
    text_norm: bool = True
    visual_norm: bool = True
    video_cls_input: str = "embed"

    def __post_init__(self) -> None:
        check_choice("visual_pool", self.visual_pool, VISUAL_POOLS)
        check_choice("video_cls_input", self.video_cls_input, VIDEO_CLS_INPUTS)
        _check_positive(self, "embed_dim")


@dataclass
class LossConfig:
    """Training losses and their coefficients.

    contrastive: ``clip`` (symmetric InfoNCE) or ``siglip`` (pairwise sigmoid).
    init_logit_scale: initial logit scale (CLIP 1/0.07; SigLIP uses 10), learned in
        log space and clamped at ``max_logit_scale``. init_logit_bias: SigLIP only.
    pair_weight / video_text_weight / classification_weight / aux_weight: coefficients
        of the image-text, video-text, video classification and MoE auxiliary losses.
    label_smoothing: of the classification cross-entropy.
    caption_positives: image-text pairs (and video-text pairs without labels) whose caption tokens are
        identical within the global batch are positives of each other (a multi-positive target, as the
        video-text loss gives clips of one class); with unique captions the loss is exactly CLIP's /
        SigLIP's. Off by default (every other row is a negative, even one with the same caption): for
        InfoNCE it changes no gradient, and SigLIP trained worse with it on the digits' validation split
        (``bench/results/digits_validation.md``).
    """

    contrastive: str = "clip"
    init_logit_scale: float = 1.0 / 0.07
    max_logit_scale: float = 100.0
    init_logit_bias: float = -10.0
    pair_weight: float = 1.0
    video_text_weight: float = 1.0
    classification_weight: float = 1.0
    aux_weight: float = 1.0
    label_smoothing: float = 0.1
    caption_positives: bool = False

    def __post_init__(self) -> None:
        check_choice("contrastive loss", self.contrastive, CONTRASTIVE_KINDS)
        _check_positive(self, "init_logit_scale", "max_logit_scale")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("pair_weight", "video_text_weight", "classification_weight", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ErnieVLConfig:
    """The whole model.

    name: preset or model name. model_id: the id of a model not yet saved (empty:
        ``ernie-vl:<name>``); a saved or loaded model's id is computed from its weights, and
        a value stored here is only compared with it (a warning when different).
    Every field's type and range is checked (``ernie_vl.limits``) when the config is made.
    num_classes / class_names: the supervised video head; ``class_names`` (if given)
        fixes ``num_classes`` to its length.
    image_mean / image_std: pixel normalisation of ``model.preprocess`` (CLIP's by default).
    """

    name: str = "custom"
    model_id: str = ""
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    video_encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    video_projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(kind="resampler"))
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    num_classes: int = 400
    class_names: list[str] | None = None
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        if self.class_names is not None:
            self.class_names = [str(c) for c in self.class_names]
            if not self.class_names:
                raise ValueError("class_names is empty; give at least one class or None")
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError(f"class_names has duplicates: {self.class_names}")
            self.num_classes = len(self.class_names)
        _check_positive(self, "num_classes")
        validate_config(self)  # every field's type and bounds (ernie_vl.limits), before anything is built

    @property
    def resolved_model_id(self) -> str:
        return self.model_id or f"ernie-vl:{self.name}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ErnieVLConfig":
        """Strict: an unknown key (at any depth) raises ``ValueError`` naming the valid ones."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; ``from_dict(to_dict())`` gives an equal config."""
        return config_to_dict(self)


# --------------------------------------------------------------------------- strict (de)serialisation


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> X; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def config_from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data`` (a dict), recursing into nested dataclass fields.

    Unknown keys raise ``ValueError`` naming them, where they are and the valid keys;
    a value of the wrong type (``num_experts: 4.0``) raises ``TypeError`` and one outside
    ``ernie_vl.limits.FIELD_BOUNDS`` ``ValueError``, both naming the field's path, before the
    section is built; lists become tuples where the field is a tuple.
    """
    label = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{label}: expected a dict of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = _unwrap_optional(hints.get(key, Any))
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp) and isinstance(tp, type) and value is not None:
            value = config_from_dict(tp, value, sub)
        else:
            check_field_type(value, hints.get(key, Any), sub)
            check_field_bounds(key, value, sub)
            if typing.get_origin(tp) is tuple and isinstance(value, list):
                value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> nested dicts / lists (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config value {value} is not finite")
        return value

    return plain(cfg)


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``data``: a dict value merges into a dict section."""
    merged = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged
