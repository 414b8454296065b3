"""The ErnieVL model: image / video / text encoders around one shared MoE backbone.

Dual-encoder use: a caption, an image and a clip each go through the shared backbone on
their own (a caption's embedding never depends on an image), so retrieval indexes built
from ``encode_image`` stay valid for any query. Per-token modality ids tell the backbone
(modality embeddings, per-modality residual gates, modality-aware routing) what it sees.

- text: token + position embedding -> backbone (causal mask, as CLIP) -> the end-of-text
  token -> text head (LayerNorm + linear) -> L2-normalised (B, E).
- image: ``ImageEncoder`` tokens (B, 1+N, C) -> image projector -> backbone (bidirectional)
  -> pooling (class token, or mean) -> visual head -> L2-normalised (B, E).
- video: ``VideoEncoder`` tokens (B, T', C) -> video projector (e.g. a resampler to M
  tokens) -> backbone -> pooling -> the same visual head -> (B, E); ``classify_video`` adds
  a linear classifier on the (unnormalised) video embedding, or, with
  ``head.video_cls_input="encoder"``, on the video encoder's pooled features (B, C).

Starting exactly from CLIP (``ernie_vl.from_open_clip``): the backbone is CLIP's text
transformer with each MLP upcycled into identical experts (top-k weights sum to 1, so the
MoE equals the MLP), the modality embeddings are zero and every block's residual gate is
1 for text and 0 for images and videos. The backbone is therefore the identity for visual
tokens (they are still routed and pass through every block; the gates are learnable, so
training opens them), the image projector holds CLIP's visual projection, and the visual
head is the identity: ``encode_image`` = normalised CLIP ``encode_image``, ``encode_text`` =
normalised CLIP ``encode_text``, and ``encode_video`` of an inflated video encoder
(``per_frame`` class tokens, zero temporal branch) = the normalised mean of the per-frame
CLIP image embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.text import TextEmbedding
from encoders.video_vit import VideoEncoder
from encoders.vit import ImageEncoder
from ernie_vl import checkpoint
from ernie_vl.backbone import BackboneOutput, SharedBackbone, causal_mask
from ernie_vl.config import ErnieVLConfig
from ernie_vl.limits import check_param_budget, validate_config
from ernie_vl.heads import ContrastiveLogits, EmbeddingHead, build_projector, pool_text_eot, pool_visual
from ernie_vl.losses import caption_groups, classification_loss, clip_loss, siglip_loss
from ernie_vl.modality import IMAGE, NAMES, TEXT, VIDEO
from ernie_vl.modality import NUM_MODALITIES
from ernie_vl.moe import RoutingStats
from ernie_vl.moe.groups import group_loss_parts
from ernie_vl.moe.stats import overlap_rate
from ernie_vl.preprocess import ImageTransform, make_tokenizer


@dataclass
class ErnieVLBatch:
    """One training batch; any of pairs, videos, or both.

    images: (Bi, 3, H, W) float, with texts: (Bi, L) int64 their captions.
    videos: (Bv, T, 3, H, W) float, with video_labels: (Bv,) int64 (or (Bv, K) float soft targets,
    e.g. mixup) and/or
    video_texts: (Bv, L) int64 (video-text contrastive).
    """

    images: torch.Tensor | None = None
    texts: torch.Tensor | None = None
    videos: torch.Tensor | None = None
    video_labels: torch.Tensor | None = None
    video_texts: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "ErnieVLBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ErnieVLBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


@dataclass
class ErnieVLOutput:
    """What ``ErnieVL.forward(batch)`` returns.

    loss: () weighted total. losses: name -> () unweighted part: ``image_text``,
        ``video_text``, ``video_cls`` (those present), ``aux`` (the MoE auxiliary losses,
        already weighted inside each MoE layer, averaged over backbone passes),
        ``load_balance`` / ``z_loss`` / ``orthogonal`` (unweighted, for logging); with modality groups
        also ``load_balance/<family>`` and ``z_loss/<family>`` per group.
    per_sample_loss: ``pairs`` (Bi,) and / or ``videos`` (Bv,), detached (loss-priority sampling).
    image_embeds / text_embeds / video_embeds / video_text_embeds: L2-normalised (B, E) or None.
    video_logits: (Bv, num_classes) or None. logit_scale: () the contrastive temperature.
    routing: one merged ``RoutingStats`` per MoE layer over all backbone passes of the batch.
    active_head_ratio: modality name -> (num_layers,) when the encoders gate heads.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    per_sample_loss: dict[str, torch.Tensor]
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None
    video_text_embeds: torch.Tensor | None = None
    video_logits: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    routing: list[RoutingStats] = field(default_factory=list)
    active_head_ratio: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Features:
    """Unnormalised embeddings of one modality and what the backbone reported."""

    embeds: torch.Tensor
    backbone: BackboneOutput
    active_head_ratio: torch.Tensor | None = None
    encoder_pooled: torch.Tensor | None = None  # (B, C) the encoder's pooled output (visual modalities)


def merge_routing_stats(passes: list[tuple[int, list[RoutingStats]]]) -> list[RoutingStats]:
    """Merge per-layer statistics of several single-modality backbone passes into one per layer.

    Counts add up; usage rows, entropy and the activated-parameter ratio are token-weighted
    means; the text-vision overlap is recomputed from the merged usage (NaN when the batch
    lacks text or visual tokens), as if the tokens had gone through one pass.
    """
    if not passes:
        return []
    merged = []
    for layer in range(len(passes[0][1])):
        stats = [(m, layer_stats[layer]) for m, layer_stats in passes]
        tokens = torch.stack([s.num_tokens.float() for _, s in stats])
        weights = tokens / tokens.sum().clamp(min=1.0)
        counts = torch.zeros(NUM_MODALITIES)
        usage = torch.zeros_like(stats[0][1].usage_by_modality)
        for (m, s), n in zip(stats, tokens):
            usage[m] += s.usage_by_modality[m].float().cpu() * n
            counts[m] += n
        usage = usage / counts[:, None].clamp(min=1.0)
        merged.append(
            RoutingStats(
                tokens_per_expert=sum(s.tokens_per_expert for _, s in stats),
                usage_by_modality=usage,
                dropped_tokens=sum(s.dropped_tokens for _, s in stats),
                router_entropy=sum(w * s.router_entropy for w, (_, s) in zip(weights, stats)),
                overlap_rate=overlap_rate(usage, counts).float(),
                activated_param_ratio=sum(w * s.activated_param_ratio for w, (_, s) in zip(weights, stats)),
                num_tokens=tokens.sum().long(),
                expert_group=stats[0][1].expert_group,
            )
        )
    return merged


def video_text_groups(labels: torch.Tensor | None) -> torch.Tensor | None:
    """The class of each clip for the video-text loss: the label, or the dominant class of soft (mixup)
    targets, whose prompt the clip is paired with; None without labels (free captions: pairs only)."""
    if labels is None:
        return None
    return labels.argmax(dim=1) if labels.dtype.is_floating_point and labels.ndim == 2 else labels.long()


class ErnieVL(nn.Module):
    """Image / video / text encoders, alignment projectors, shared MoE backbone, heads.

    ``encode_image((B,3,H,W)) / encode_video((B,T,3,H,W)) / encode_text((B,L) int64)``
    -> L2-normalised (B, E); ``classify_video`` -> (B, num_classes) logits;
    ``forward(ErnieVLBatch)`` -> ``ErnieVLOutput``. Attributes ``tokenizer``,
    ``preprocess``, ``class_names`` and ``model_id``. See the module docstring.
    """

    def __init__(self, cfg: ErnieVLConfig, max_params: int | None = None, model_id: str | None = None,
                 checkpoint_metadata: dict[str, str] | None = None) -> None:
        """Build from ``cfg``; refuses (``ModelTooLargeError``, with the count) a config over ``max_params``
        parameters (default: ``$ERNIE_VL_MAX_PARAMS`` or ``ernie_vl.limits.DEFAULT_MAX_PARAMS``) before
        allocating anything. ``model_id`` (default ``cfg.resolved_model_id``): what indexes record;
        ``from_pretrained`` sets the id computed from the weights. ``checkpoint_metadata``: provenance
        entries (e.g. ``trained_on``) that ``save_pretrained`` writes into the weights' header;
        ``from_pretrained`` sets the file's."""
        super().__init__()
        if not isinstance(cfg, ErnieVLConfig):
            raise TypeError(f"ErnieVL needs an ErnieVLConfig, got {type(cfg).__name__}")
        validate_config(cfg)  # again: a config's fields may have been changed after it was made
        check_param_budget(cfg, max_params)
        for name in ("image_encoder", "video_encoder"):
            if getattr(cfg, name).embed_dim is not None:
                raise ValueError(
                    f"{name}.embed_dim must be None (got {getattr(cfg, name).embed_dim}): "
                    "the alignment projector maps the encoder's tokens into the backbone"
                )
        self.cfg = cfg
        width, embed_dim = cfg.backbone.width, cfg.head.embed_dim
        self.image_encoder = ImageEncoder(cfg.image_encoder)
        self.video_encoder = VideoEncoder(cfg.video_encoder)
        self.text_embedding = TextEmbedding(cfg.text.vocab_size, width, cfg.text.context_length)
        self.image_projector = build_projector(cfg.image_projector, cfg.image_encoder.width, width)
        self.video_projector = build_projector(cfg.video_projector, cfg.video_encoder.width, width)
        self.backbone = SharedBackbone.from_config(cfg.backbone)
        self.text_head = EmbeddingHead(width, embed_dim, cfg.head.text_norm)
        self.visual_head = EmbeddingHead(width, embed_dim, cfg.head.visual_norm)
        bias = cfg.loss.init_logit_bias if cfg.loss.contrastive == "siglip" else None
        self.logits = ContrastiveLogits(cfg.loss.init_logit_scale, cfg.loss.max_logit_scale, bias)
        cls_dim = cfg.video_encoder.width if cfg.head.video_cls_input == "encoder" else embed_dim
        self.classifier = nn.Linear(cls_dim, cfg.num_classes)
        self.preprocess = ImageTransform(cfg.image_encoder.image_size[0], cfg.image_mean, cfg.image_std)
        self.tokenizer = make_tokenizer(cfg.text.vocab_size, cfg.text.context_length)
        self.class_names: list[str] | None = list(cfg.class_names) if cfg.class_names else None
        self.model_id: str = model_id or cfg.resolved_model_id
        self.checkpoint_metadata: dict[str, str] = checkpoint.check_metadata(checkpoint_metadata)

    def get_tokenizer(self) -> Any:
        """The tokenizer at this model's context length and vocabulary (``tok(["a dog"]) -> (1, L)`` int64)."""
        return make_tokenizer(self.cfg.text.vocab_size, self.cfg.text.context_length)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory: str, metadata: dict[str, str] | None = None) -> "checkpoint.SavedCheckpoint":
        """Write ``config.json`` + ``model.safetensors`` (see ``ernie_vl.checkpoint``) with the header entries
        ``checkpoint_metadata`` updated by ``metadata``. The model is unchanged; the result carries the
        ``model_id`` that ``from_pretrained`` of the folder will give."""
        return checkpoint.save_pretrained(self, directory, {**self.checkpoint_metadata, **(metadata or {})})

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu",
                        max_params: int | None = None) -> "ErnieVL":
        """Load a ``save_pretrained`` folder strictly (every key mismatch is named); its config is
        validated and its parameter count checked against ``max_params`` before anything is read."""
        return checkpoint.from_pretrained(cls, directory, map_location, max_params)

    # ------------------------------------------------------------------ features

    @property
    def device(self) -> torch.device:
        return self.logits.log_scale.device

    def _check_tokens(self, tokens: Any, what: str) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{what} must be a (B, L) int64 tensor (use model.tokenizer), got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"{what} must be (B, L) token ids, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
        context = self.cfg.text.context_length
        if tokens.shape[1] > context:
            # longer input is fine while everything past the context is padding (id 0): CLIP's 77-token
            # tokenizer on a 16-token model, a 3-word caption
            beyond = tokens[:, context:]
            if bool(beyond.any()):
                used = int((tokens != 0).long().cumsum(1).argmax(1).max()) + 1
                raise ValueError(
                    f"{what} holds {used} tokens (padding trimmed), more than this model's context_length "
                    f"{context}; tokenize with model.get_tokenizer() / ernie_vl.get_tokenizer(model), which truncates"
                )
            tokens = tokens[:, :context]
        return tokens.long()

    def text_features(self, tokens: torch.Tensor) -> _Features:
        """(B, L) ids -> unnormalised (B, E) and the backbone output (hidden states trimmed to L').

        The columns after the batch's last end-of-text token are cut first (L' = 1 + the largest
        EOT position): with the causal mask, EOT pooling and padding excluded from routing and
        the MoE losses, they change nothing, and short captions padded to the full context
        would otherwise cost most of the text forward."""
        tokens = self._check_tokens(tokens, "texts")
        eot = tokens.argmax(dim=-1)
        needed = int(eot.max()) + 1 if tokens.numel() else tokens.shape[1]
        if needed < tokens.shape[1]:
            tokens = tokens[:, :needed]
        x = self.text_embedding(tokens)
        b, length = tokens.shape
        ids = torch.full((b, length), TEXT, dtype=torch.long, device=tokens.device)
        padding = torch.arange(length, device=tokens.device)[None, :] > eot[:, None]
        out = self.backbone(x, ids, attn_mask=causal_mask(length, tokens.device), padding_mask=padding)
        return _Features(self.text_head(pool_text_eot(out.hidden, tokens)), out)

    def _visual_features(self, encoder: nn.Module, projector: nn.Module, keep: str, pixels: torch.Tensor,
                         modality: int, routing: bool = True) -> _Features:
        enc = encoder(pixels)
        visual = enc.tokens[:, : enc.num_prefix_tokens] if keep == "prefix" else enc.tokens
        layout = {"grid": enc.grid, "num_frames": enc.num_frames} if getattr(projector, "takes_layout", False) else {}
        tokens, num_prefix = projector(visual, enc.num_prefix_tokens, **layout)
        ids = torch.full(tokens.shape[:2], modality, dtype=torch.long, device=tokens.device)
        out = self.backbone(tokens, ids, routing=routing)
        pooled = pool_visual(out.hidden, self.cfg.head.visual_pool, num_prefix)
        return _Features(self.visual_head(pooled), out, enc.active_head_ratio, enc.pooled)

    def image_features(self, images: torch.Tensor, routing: bool = True) -> _Features:
        """(B, 3, H, W) -> unnormalised (B, E) and the backbone output.

        ``routing=False``: backbone blocks that are closed for images skip their routers too (their
        routing statistics are then missing from the backbone output; the embeddings are the same)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) float tensor, got {shape}")
        return self._visual_features(self.image_encoder, self.image_projector, self.cfg.image_projector.tokens,
                                    images, IMAGE, routing)

    @staticmethod
    def _check_clips(clips: torch.Tensor) -> None:
        if not isinstance(clips, torch.Tensor) or clips.dim() != 5:
            shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ValueError(f"videos must be a (B, T, 3, H, W) float tensor, got {shape}")

    def video_features(self, clips: torch.Tensor, routing: bool = True) -> _Features:
        """(B, T, 3, H, W) -> unnormalised (B, E) and the backbone output (``routing`` as for images)."""
        self._check_clips(clips)
        return self._visual_features(self.video_encoder, self.video_projector, self.cfg.video_projector.tokens,
                                    clips, VIDEO, routing)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> (B, E), L2-normalised."""
        return F.normalize(self.text_features(tokens).embeds, dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> (B, E), L2-normalised."""
        return F.normalize(self.image_features(images, routing=False).embeds, dim=-1)

    def encode_video(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) float -> (B, E), L2-normalised."""
        return F.normalize(self.video_features(clips, routing=False).embeds, dim=-1)

    def classify_video(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) float -> (B, num_classes) logits of the supervised head (an encoder-reading
        head runs the video encoder only: the projector and backbone would not change its logits)."""
        if self.cfg.head.video_cls_input == "encoder":
            self._check_clips(clips)
            return self.classifier(self.video_encoder(clips).pooled)
        return self._video_logits(self.video_features(clips, routing=False))

    def _video_logits(self, vid: _Features) -> torch.Tensor:
        """The classifier on what ``cfg.head.video_cls_input`` names: the video embedding or the encoder's
        pooled features."""
        if self.cfg.head.video_cls_input == "encoder":
            return self.classifier(vid.encoder_pooled)
        return self.classifier(vid.embeds)

    # ------------------------------------------------------------------ training

    def _contrastive(self, a: torch.Tensor, b: torch.Tensor,
                     groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.logits.scale()
        if self.cfg.loss.contrastive == "siglip":
            assert self.logits.bias is not None
            return siglip_loss(a, b, scale, self.logits.bias, groups)
        return clip_loss(a, b, scale, groups)

    @staticmethod
    def _check_batch(batch: ErnieVLBatch) -> None:
        if not isinstance(batch, ErnieVLBatch):
            raise TypeError(f"forward takes an ErnieVLBatch, got {type(batch).__name__}")
        if batch.images is None and batch.videos is None:
            raise ValueError("the batch has neither images (with texts) nor videos (with labels or texts)")
        if batch.images is not None and batch.texts is None:
            raise ValueError("images need their captions in batch.texts for the image-text loss")
        if batch.texts is not None and batch.images is None:
            raise ValueError("batch.texts are the captions of batch.images, but the batch has no images")
        if batch.videos is not None and batch.video_labels is None and batch.video_texts is None:
            raise ValueError("videos need video_labels and/or video_texts to give a loss")
        if batch.videos is None and (batch.video_labels is not None or batch.video_texts is not None):
            raise ValueError("video_labels / video_texts given without videos")
        for name, other in (("texts", "images"), ("video_labels", "videos"), ("video_texts", "videos")):
            first, second = getattr(batch, name), getattr(batch, other)
            if first is not None and second is not None and first.shape[0] != second.shape[0]:
                raise ValueError(
                    f"batch size mismatch: {other} has {second.shape[0]} rows but {name} has {first.shape[0]}"
                )

    def forward(self, batch: ErnieVLBatch) -> ErnieVLOutput:
        """Losses of one batch (see ``ErnieVLOutput``)."""
        self._check_batch(batch)
        w = self.cfg.loss
        losses: dict[str, torch.Tensor] = {}
        per_sample: dict[str, torch.Tensor] = {}
        passes: list[tuple[int, BackboneOutput]] = []
        head_ratio: dict[str, torch.Tensor] = {}
        total = self.logits.log_scale.new_zeros(())
        out = ErnieVLOutput(loss=total, losses=losses, per_sample_loss=per_sample, logit_scale=self.logits.scale().detach())

        if batch.images is not None:
            img, txt = self.image_features(batch.images), self.text_features(batch.texts)
            passes += [(IMAGE, img.backbone), (TEXT, txt.backbone)]
            if img.active_head_ratio is not None:
                head_ratio[NAMES[IMAGE]] = img.active_head_ratio
            out.image_embeds = F.normalize(img.embeds, dim=-1)
            out.text_embeds = F.normalize(txt.embeds, dim=-1)
            # with loss.caption_positives (an opt-in), identical captions are positives of each other
            groups = caption_groups(batch.texts) if w.caption_positives else None
            loss, ps = self._contrastive(out.image_embeds, out.text_embeds, groups)
            losses["image_text"], per_sample["pairs"] = loss, ps.detach()
            total = total + w.pair_weight * loss

        if batch.videos is not None:
            vid = self.video_features(batch.videos)
            passes.append((VIDEO, vid.backbone))
            if vid.active_head_ratio is not None:
                head_ratio[NAMES[VIDEO]] = vid.active_head_ratio
            out.video_embeds = F.normalize(vid.embeds, dim=-1)
            video_ps = torch.zeros(batch.videos.shape[0], device=vid.embeds.device)
            if batch.video_labels is not None:
                out.video_logits = self._video_logits(vid)
                loss, ps = classification_loss(out.video_logits, batch.video_labels, w.label_smoothing)
                losses["video_cls"] = loss
                total = total + w.classification_weight * loss
                video_ps = video_ps + w.classification_weight * ps.detach()
            if batch.video_texts is not None:
                vtxt = self.text_features(batch.video_texts)
                passes.append((TEXT, vtxt.backbone))
                out.video_text_embeds = F.normalize(vtxt.embeds, dim=-1)
                # clips of one class are all positives of that class's prompts (ActionCLIP), not negatives
                groups = video_text_groups(batch.video_labels)
                if groups is None and w.caption_positives:
                    groups = caption_groups(batch.video_texts)
                loss, ps = self._contrastive(out.video_embeds, out.video_text_embeds, groups)
                losses["video_text"] = loss
                total = total + w.video_text_weight * loss
                video_ps = video_ps + w.video_text_weight * ps.detach()
            per_sample["videos"] = video_ps

        n = float(len(passes))
        losses["aux"] = sum(p.aux_loss for _, p in passes) / n
        losses["load_balance"] = (sum(p.load_balance_loss for _, p in passes) / n).detach()
        losses["z_loss"] = (sum(p.z_loss for _, p in passes) / n).detach()
        losses["orthogonal"] = (sum(p.orthogonal_loss for _, p in passes) / n).detach()
        moe_cfg = self.backbone.moe_config
        if moe_cfg is not None and moe_cfg.routing == "groups":  # each pass is one modality: one group's losses
            losses.update(group_loss_parts(moe_cfg, passes))
        out.loss = total + w.aux_weight * losses["aux"]
        out.routing = merge_routing_stats([(m, p.layer_stats) for m, p in passes])
        out.active_head_ratio = head_ratio
        return out
