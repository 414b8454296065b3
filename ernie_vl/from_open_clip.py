"""Start an ErnieVL from an open_clip CLIP model, exactly (see ``ernie_vl.model`` for the mechanism).

The image encoder is CLIP's visual trunk (``encoders.convert.image_encoder_from_open_clip``)
without its projection, which moves into the image projector; the video encoder is that
trunk inflated in time (``per_frame`` class tokens, zero temporal branch) with the same
projection; the text embedding is CLIP's; the shared backbone is CLIP's text transformer
with every MLP upcycled into ``num_experts`` identical experts (top-``top_k`` routing) and
residual gates (text 1, image 0, video 0); the text head is ``ln_final`` + ``text_projection``
and the visual head is the identity (no norm). CLIP's LayerScale, if any, is folded into
the backbone's output projections.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from encoders.convert import image_encoder_from_open_clip, video_encoder_from_image_encoder
from encoders.video_vit import VideoEncoderConfig
from encoders.vit import ImageEncoderConfig
from ernie_vl.backbone import BackboneConfig
from ernie_vl.config import ErnieVLConfig, HeadConfig, LossConfig, ProjectorConfig, TextConfig
from ernie_vl.moe import MoEConfig
from ernie_vl.moe.upcycle import activation_name
from ernie_vl.preprocess import CLIP_MEAN, CLIP_STD

ROUTER_INIT_STD = 0.02  # the init of ernie_vl.moe.router.Router


def _layer_scale(ls: nn.Module, width: int) -> torch.Tensor:
    """The per-channel scale of an open_clip ``ls_1`` / ``ls_2`` (ones for Identity)."""
    gamma = getattr(ls, "gamma", None)
    return torch.ones(width) if gamma is None else gamma.detach().float()


def _check_text_tower(clip_model: nn.Module) -> None:
    problems = []
    if not hasattr(clip_model, "transformer") or not hasattr(clip_model, "token_embedding"):
        problems.append("it has no built-in text transformer (a CustomTextCLIP / HF text tower)")
    elif getattr(clip_model, "text_pool_type", "argmax") != "argmax":
        problems.append(f"text_pool_type {clip_model.text_pool_type!r} (only 'argmax' is supported)")
    elif getattr(clip_model, "attn_mask", None) is None:
        problems.append("its text transformer is not causal")
    if problems:
        raise ValueError(f"cannot import this open_clip model: {'; '.join(problems)}")


def config_from_open_clip(clip_model: nn.Module, num_experts: int, top_k: int, num_frames: int,
                          image_cfg: ImageEncoderConfig, name: str, visual_tokens: str = "all") -> ErnieVLConfig:
    """The ``ErnieVLConfig`` that mirrors ``clip_model`` (encoder configs without projection)."""
    blocks = clip_model.transformer.resblocks
    block = blocks[0]
    width = clip_model.transformer.width
    text_proj = clip_model.text_projection
    embed_dim = text_proj.out_features if isinstance(text_proj, nn.Linear) else text_proj.shape[1]
    if width < embed_dim:
        raise ValueError(
            f"text width {width} < embedding size {embed_dim}: the visual embedding cannot pass through "
            "the backbone unchanged; only CLIP models with text width >= embed dim are supported"
        )
    act = activation_name(block.mlp.gelu)
    hidden = block.mlp.c_fc.out_features
    image_fields = {**asdict(image_cfg), "embed_dim": None}
    logit_bias = getattr(clip_model, "logit_bias", None)
    if isinstance(text_proj, nn.Linear) and text_proj.bias is not None:
        raise ValueError("cannot import a text_projection with a bias; the text head projection has none")
    return ErnieVLConfig(
        name=name,
        image_mean=tuple(getattr(clip_model.visual, "image_mean", None) or CLIP_MEAN),
        image_std=tuple(getattr(clip_model.visual, "image_std", None) or CLIP_STD),
        image_encoder=ImageEncoderConfig(**image_fields),
        video_encoder=VideoEncoderConfig(**image_fields, num_frames=num_frames, attention="divided",
                                         cls_mode="per_frame"),
        text=TextConfig(vocab_size=clip_model.vocab_size, context_length=clip_model.context_length),
        image_projector=ProjectorConfig(kind="linear", tokens=visual_tokens),
        video_projector=ProjectorConfig(kind="linear", tokens=visual_tokens),
        backbone=BackboneConfig(
            width=width, depth=len(blocks), num_heads=block.attn.num_heads, mlp_hidden=hidden,
            activation=act, moe_every=1, gate_init=(1.0, 0.0, 0.0), modality_embed=True,
            ln_eps=block.ln_1.eps,
            moe=MoEConfig(hidden=hidden, num_experts=num_experts, top_k=top_k, activation=act),
        ),
        head=HeadConfig(embed_dim=embed_dim, visual_pool="cls", text_norm=True, visual_norm=False),
        loss=LossConfig(
            contrastive="siglip" if logit_bias is not None else "clip",
            init_logit_scale=float(clip_model.logit_scale.detach().exp()),
            init_logit_bias=float(logit_bias) if logit_bias is not None else -10.0,
        ),
    )


@torch.no_grad()
def from_open_clip(clip_model: nn.Module, num_experts: int = 8, top_k: int = 2, num_frames: int = 8,
                   name: str = "open_clip", visual_tokens: str = "all"):
    """An ``ErnieVL`` that starts as ``clip_model`` (an open_clip ``CLIP`` with a ViT tower).

    At initialisation ``encode_text`` / ``encode_image`` equal CLIP's normalised
    ``encode_text`` / ``encode_image``, and ``encode_video`` the normalised mean of the
    per-frame CLIP image embeddings. Float32 copies of the weights are used.
    ``visual_tokens="prefix"`` sends only the class token(s) of images and clips through the
    backbone (the same embeddings at init, a much cheaper visual path; see ``ProjectorConfig``).
    """
    from ernie_vl.model import ErnieVL

    _check_text_tower(clip_model)
    image_encoder = image_encoder_from_open_clip(clip_model)
    cfg = config_from_open_clip(clip_model, num_experts, top_k, num_frames, image_encoder.cfg, name, visual_tokens)
    video_encoder = video_encoder_from_image_encoder(image_encoder, num_frames, "divided", "per_frame")
    visual_proj = image_encoder.head.weight.detach().clone() if image_encoder.head is not None else None
    trunk_width = image_encoder.cfg.width
    for encoder, enc_cfg in ((image_encoder, cfg.image_encoder), (video_encoder, cfg.video_encoder)):
        encoder.head, encoder.cfg = None, enc_cfg  # CLIP's projection moves into the projectors
    # The other parts are built on the meta device (no costly random init of weights that CLIP
    # overwrites), materialised, and written tensor by tensor; _check_all_written finds any gap.
    # saved checkpoints say where the weights came from (``ernie-vl train`` keeps the inflated video path)
    with torch.device("meta"):
        model = ErnieVL(cfg, checkpoint_metadata={"trained_on": "open_clip"})
    model.image_encoder, model.video_encoder = image_encoder, video_encoder
    for child_name, child in model.named_children():
        if child_name not in ("image_encoder", "video_encoder"):
            child.to_empty(device="cpu")
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    written: set[str] = set()

    def put(key: str, value: torch.Tensor) -> None:
        tensors[key].copy_(value)
        written.add(key)

    width, embed_dim = cfg.backbone.width, cfg.head.embed_dim
    for prefix in ("image_projector", "video_projector"):
        weight = torch.zeros(width, trunk_width)
        weight[:embed_dim] = torch.eye(embed_dim, trunk_width) if visual_proj is None else visual_proj
        put(f"{prefix}.proj.weight", weight)
        put(f"{prefix}.proj.bias", torch.zeros(width))
    put("visual_head.proj.weight", torch.eye(embed_dim, width))
    put("text_head.norm.weight", clip_model.ln_final.weight.float())
    put("text_head.norm.bias", clip_model.ln_final.bias.float())
    text_proj = clip_model.text_projection
    put("text_head.proj.weight", text_proj.weight if isinstance(text_proj, nn.Linear) else text_proj.t())
    put("text_embedding.token_embedding.weight", clip_model.token_embedding.weight.float())
    put("text_embedding.positional_embedding", clip_model.positional_embedding.float())
    put("logits.log_scale", clip_model.logit_scale.float().reshape(()))
    if model.logits.bias is not None:
        put("logits.bias", clip_model.logit_bias.float().reshape(()))
    model.classifier.reset_parameters()
    written.update({"classifier.weight", "classifier.bias"})
    if model.backbone.modality_embed is not None:
        put("backbone.modality_embed.weight", torch.zeros(model.backbone.modality_embed.weight.shape))
    for i, (block, src) in enumerate(zip(model.backbone.blocks, clip_model.transformer.resblocks)):
        p = f"backbone.blocks.{i}"
        gamma_1, gamma_2 = _layer_scale(src.ls_1, width), _layer_scale(src.ls_2, width)
        for ln in ("ln_1", "ln_2"):
            put(f"{p}.{ln}.weight", getattr(src, ln).weight.float())
            put(f"{p}.{ln}.bias", getattr(src, ln).bias.float())
        put(f"{p}.attn.qkv.weight", src.attn.in_proj_weight.float())
        put(f"{p}.attn.qkv.bias", src.attn.in_proj_bias.float())
        put(f"{p}.attn.proj.weight", gamma_1[:, None] * src.attn.out_proj.weight.float())
        put(f"{p}.attn.proj.bias", gamma_1 * src.attn.out_proj.bias.float())
        put(f"{p}.gate", torch.tensor(cfg.backbone.gate_init))
        put(f"{p}.mlp.router.weight", torch.randn(block.mlp.router.weight.shape) * ROUTER_INIT_STD)
        block.load_dense_mlp_({
            "activation": cfg.backbone.activation,
            "fc_weight": src.mlp.c_fc.weight.float(), "fc_bias": src.mlp.c_fc.bias.float(),
            "proj_weight": gamma_2[:, None] * src.mlp.c_proj.weight.float(),
            "proj_bias": gamma_2 * src.mlp.c_proj.bias.float(),
        })
        written.update(f"{p}.mlp.{k}" for k, _ in block.mlp.named_parameters() if not k.startswith("router."))
    _check_all_written(tensors, written)
    return model.float().eval()


def _check_all_written(tensors: dict[str, torch.Tensor], written: set[str]) -> None:
    """Every tensor outside the converted encoders must have been written."""
    left = sorted(k for k in tensors if k not in written and not k.startswith(("image_encoder.", "video_encoder.")))
    if left:
        raise RuntimeError(f"from_open_clip left tensors uninitialised: {left}")
