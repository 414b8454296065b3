"""Exact weight import from open_clip, timm and Hugging Face TimeSformer, and
inflation of an image encoder into a video encoder.

Every converter builds a config that describes the source model, maps its state
dict key by key and loads it strictly: a missing, unexpected or mis-shaped key
raises ``ValueError`` naming each one. The result has gating off and no local
windows, so it computes exactly what the source computes.
"""
from __future__ import annotations

import re
from dataclasses import asdict

import torch
from torch import nn

from .activations import act_name, canonical_act
from .video_stem import ConvStemConfig
from .video_vit import VideoEncoder, VideoEncoderConfig
from .vit import ImageEncoder, ImageEncoderConfig

Rules = list[tuple[str, str]]


def rename_keys(state: dict[str, torch.Tensor], rules: Rules) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(regex, replacement)`` rule to each key; others pass through."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise ``ValueError`` naming every missing, unexpected and mis-shaped key of ``state`` for ``module``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    problems = [f"{what} ({len(keys)}) {keys}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if problems:
        raise ValueError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], assign: bool = False,
                source: str = "state dict") -> None:
    """``load_state_dict`` after :func:`check_state_dict`, so every bad key is named at once.

    ``assign=True`` adopts the given tensors (for modules built on the meta device).
    """
    check_state_dict(module, state, source)
    module.load_state_dict(state, strict=True, assign=assign)


def _source_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 copies of a source model's tensors (never shared with the source)."""
    return {k: v.detach().to(dtype=torch.float32, copy=True) for k, v in module.state_dict().items()}


def _build_empty(cls, cfg):
    """Build an encoder without allocating or initialising weights (they are loaded next)."""
    with torch.device("meta"):
        return cls(cfg)


def _activation_name(act: nn.Module, where: str) -> str:
    try:
        return act_name(act)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _layer_scale_init(ls: nn.Module) -> float | None:
    gamma = getattr(ls, "gamma", None)
    return None if gamma is None else 1.0


# ----------------------------------------------------------------------------- open_clip

OPEN_CLIP_RULES: Rules = [
    (r"^conv1\.weight$", "patch_embed.weight"),
    (r"^class_embedding$", "cls_token"),
    (r"^positional_embedding$", "pos_embed"),
    (r"^ln_pre\.", "norm_pre."),
    (r"^ln_post\.", "norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
    (r"^transformer\.resblocks\.(\d+)\.ls_1\.", r"blocks.\1.ls1."),
    (r"^transformer\.resblocks\.(\d+)\.ls_2\.", r"blocks.\1.ls2."),
]


def open_clip_config(visual: nn.Module, attn_impl: str = "fused") -> ImageEncoderConfig:
    """The ``ImageEncoderConfig`` of an open_clip ``VisionTransformer``."""
    unsupported = []
    if getattr(visual, "attn_pool", None) is not None:
        unsupported.append("attentional pooling")
    if getattr(visual, "final_ln_after_pool", False):
        unsupported.append("final_ln_after_pool")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        unsupported.append(f"pool_type {visual.pool_type!r}")
    blocks = visual.transformer.resblocks
    block = blocks[0]
    if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, nn.MultiheadAttention):
        unsupported.append(f"block type {type(block).__name__}")
    if unsupported:
        raise ValueError(f"cannot import this open_clip vision tower: unsupported {', '.join(unsupported)}")
    width = visual.conv1.out_channels
    return ImageEncoderConfig(
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        in_chans=visual.conv1.in_channels,
        width=width,
        depth=len(blocks),
        num_heads=block.attn.num_heads,
        mlp_dim=block.mlp.c_fc.out_features,
        qkv_bias=block.attn.in_proj_bias is not None,
        proj_bias=block.attn.out_proj.bias is not None,
        patch_bias=visual.conv1.bias is not None,
        pre_norm=isinstance(visual.ln_pre, nn.LayerNorm),
        norm_eps=visual.ln_post.eps,
        act=_activation_name(block.mlp.gelu, "open_clip mlp"),
        ls_init=_layer_scale_init(block.ls_1),
        pool="cls" if visual.pool_type == "tok" else "avg",
        embed_dim=None if visual.proj is None else visual.proj.shape[1],
        head_bias=False,
        attn_impl=attn_impl,
    )


def image_encoder_from_open_clip(clip_model: nn.Module, attn_impl: str = "fused") -> ImageEncoder:
    """ImageEncoder with the weights of an open_clip CLIP model (or its ``.visual``).

    ``enc(x).pooled == clip_model.encode_image(x)`` (unnormalised) in float32.
    """
    visual = getattr(clip_model, "visual", clip_model)
    if type(visual).__name__ != "VisionTransformer" or not hasattr(visual, "conv1"):
        raise TypeError(f"expected an open_clip CLIP model with a ViT tower, got {type(visual).__name__}")
    cfg = open_clip_config(visual, attn_impl)
    enc = _build_empty(ImageEncoder, cfg)
    state = rename_keys(_source_state(visual), OPEN_CLIP_RULES)
    proj = state.pop("proj", None)
    if proj is not None:
        state["head.weight"] = proj.t().contiguous()
    load_strict(enc, state, assign=True)
    return enc


# ----------------------------------------------------------------------------- timm

TIMM_RULES: Rules = [
    (r"^patch_embed\.proj\.", "patch_embed."),
    (r"^blocks\.(\d+)\.ls1\.gamma$", r"blocks.\1.ls1.gamma"),
]


def timm_config(vit: nn.Module, attn_impl: str = "fused") -> ImageEncoderConfig:
    """The ``ImageEncoderConfig`` of a timm ``VisionTransformer`` (classifier head dropped)."""
    unsupported = []
    if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "cls_token", None) is None:
        unsupported.append(f"num_prefix_tokens={getattr(vit, 'num_prefix_tokens', None)} (needs one class token)")
    if getattr(vit, "pos_embed", None) is None:
        unsupported.append("no learned pos_embed")
    if getattr(vit, "no_embed_class", False):
        unsupported.append("no_embed_class")
    if not isinstance(vit.norm, nn.LayerNorm):
        unsupported.append(f"final norm {type(vit.norm).__name__}")
    if getattr(vit, "global_pool", "token") not in ("token", "avg"):
        unsupported.append(f"global_pool {vit.global_pool!r}")
    block = vit.blocks[0]
    for name in ("q_norm", "k_norm", "norm"):
        sub = getattr(block.attn, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            unsupported.append(f"attn.{name}")
    if not isinstance(getattr(vit.patch_embed, "norm", nn.Identity()), nn.Identity):
        unsupported.append("patch_embed.norm")
    if not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
        unsupported.append("mlp.norm")
    if type(block.mlp).__name__ != "Mlp":
        unsupported.append(f"mlp type {type(block.mlp).__name__}")
    if unsupported:
        raise ValueError(f"cannot import this timm ViT: unsupported {', '.join(unsupported)}")
    proj = vit.patch_embed.proj
    grid = tuple(vit.patch_embed.grid_size)
    patch = tuple(proj.kernel_size)
    width = proj.out_channels
    return ImageEncoderConfig(
        image_size=(grid[0] * patch[0], grid[1] * patch[1]),
        patch_size=patch,
        in_chans=proj.in_channels,
        width=width,
        depth=len(vit.blocks),
        num_heads=block.attn.num_heads,
        mlp_dim=block.mlp.fc1.out_features,
        qkv_bias=block.attn.qkv.bias is not None,
        proj_bias=block.attn.proj.bias is not None,
        patch_bias=proj.bias is not None,
        pre_norm=isinstance(vit.norm_pre, nn.LayerNorm),
        norm_eps=vit.norm.eps,
        act=_activation_name(block.mlp.act, "timm mlp"),
        ls_init=_layer_scale_init(block.ls1),
        pool="cls" if getattr(vit, "global_pool", "token") == "token" else "avg",
        embed_dim=None,
        attn_impl=attn_impl,
    )


def image_encoder_from_timm(timm_vit: nn.Module, attn_impl: str = "fused") -> ImageEncoder:
    """ImageEncoder with the weights of a timm ViT; ``enc(x).tokens == timm_vit.forward_features(x)``."""
    if type(timm_vit).__name__ != "VisionTransformer" or not hasattr(timm_vit, "patch_embed"):
        raise TypeError(f"expected a timm VisionTransformer, got {type(timm_vit).__name__}")
    cfg = timm_config(timm_vit, attn_impl)
    enc = _build_empty(ImageEncoder, cfg)
    state = {k: v for k, v in _source_state(timm_vit).items() if not k.startswith(("head.", "fc_norm."))}
    state["cls_token"] = state["cls_token"].reshape(-1)
    state["pos_embed"] = state["pos_embed"].reshape(-1, cfg.width)
    load_strict(enc, rename_keys(state, TIMM_RULES), assign=True)
    return enc


# ----------------------------------------------------------------------------- HF TimeSformer

HF_ATTENTION = {"divided_space_time": "divided", "joint_space_time": "joint", "space_only": "space_only"}

HF_TIMESFORMER_RULES: Rules = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.time_embeddings$", "time_embed"),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.temporal_layernorm\.", r"blocks.\1.temporal_norm."),
    (r"^encoder\.layer\.(\d+)\.temporal_attention\.attention\.qkv\.", r"blocks.\1.temporal_attn.qkv."),
    (r"^encoder\.layer\.(\d+)\.temporal_attention\.output\.dense\.", r"blocks.\1.temporal_attn.proj."),
    (r"^encoder\.layer\.(\d+)\.temporal_dense\.", r"blocks.\1.temporal_proj."),
    (r"^layernorm\.", "norm."),
]


def hf_timesformer_config(config, attn_impl: str = "fused") -> VideoEncoderConfig:
    """The ``VideoEncoderConfig`` of a ``transformers.TimesformerConfig``.

    ``divided_space_time`` and ``joint_space_time`` map to ``cls_mode="shared"``
    (token layout of ``last_hidden_state``: class token, then patches in (h, w, t)
    order); ``space_only`` maps to ``per_frame`` (HF returns frames as batch rows).
    Position / time embeddings resample with ``nearest`` as HF does.
    """
    if config.attention_type not in HF_ATTENTION:
        raise ValueError(f"unknown TimeSformer attention_type {config.attention_type!r}; valid: {', '.join(HF_ATTENTION)}")
    act = config.hidden_act
    try:
        act = canonical_act(act)
    except (TypeError, ValueError) as err:
        raise ValueError(f"unsupported TimeSformer hidden_act: {err}") from None
    attention = HF_ATTENTION[config.attention_type]
    return VideoEncoderConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        width=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        qkv_bias=config.qkv_bias,
        proj_bias=True,
        patch_bias=True,
        pre_norm=False,
        norm_eps=config.layer_norm_eps,
        act=act,
        pool="cls",
        embed_dim=None,
        attn_impl=attn_impl,
        pos_interp="nearest",
        num_frames=config.num_frames,
        attention=attention,
        cls_mode="per_frame" if attention == "space_only" else "shared",
        temporal_interp="nearest",
    )


def video_encoder_from_hf_timesformer(hf_model: nn.Module, attn_impl: str = "fused") -> VideoEncoder:
    """VideoEncoder with the weights of a ``TimesformerModel`` (or ``...ForVideoClassification``).

    For ``divided_space_time`` / ``joint_space_time``:
    ``enc(clips).tokens == hf_model(pixel_values=clips).last_hidden_state``.
    """
    model = getattr(hf_model, "timesformer", hf_model)
    if type(model).__name__ != "TimesformerModel":
        raise TypeError(f"expected a transformers TimesformerModel, got {type(hf_model).__name__}")
    cfg = hf_timesformer_config(model.config, attn_impl)
    enc = _build_empty(VideoEncoder, cfg)
    state = rename_keys(_source_state(model), HF_TIMESFORMER_RULES)
    state["cls_token"] = state["cls_token"].reshape(-1)
    state["pos_embed"] = state["pos_embed"].reshape(-1, cfg.width)
    if "time_embed" in state:
        state["time_embed"] = state["time_embed"].reshape(-1, cfg.width)
    load_strict(enc, state, assign=True)
    return enc


# ----------------------------------------------------------------------------- inflation


DIFF_INITS = ("zero", "pixels")  # how inflation starts the frame-difference inputs' weights
#: the start every inflation takes unless told otherwise (the trainer's ``--video-diff-init`` default too)
DEFAULT_DIFF_INIT = "pixels"


def check_diff_init(diff_init: str, what: str = "frame-difference initialisation") -> None:
    """ValueError naming ``diff_init`` and the valid starts unless it is one of :data:`DIFF_INITS`."""
    if diff_init not in DIFF_INITS:
        raise ValueError(f"unknown {what} {diff_init!r}; valid: {list(DIFF_INITS)}")


def inflate_kernel(kernel: torch.Tensor, shape: torch.Size, mode: str,
                   diff_init: str = DEFAULT_DIFF_INIT) -> torch.Tensor:
    """A 2D kernel (O, I, kh, kw) as a 3D one of ``shape`` (O, I', kt, kh, kw), I' >= I.

    ``mode="mean"``: kernel / kt in every time slice (I3D's averaging); ``"centre"``: the kernel in the
    centre slice, zeros elsewhere. Input channels beyond I (the frame differences, I' = 2I) get the pixels'
    inflated kernel with ``diff_init="pixels"`` (the default, :data:`DEFAULT_DIFF_INIT`: TSN's cross-modality
    start of its RGB-difference network; a still clip's differences are zero, so it still meets only the
    pixels' weights), or zeros with ``diff_init="zero"``."""
    check_diff_init(diff_init)
    out = kernel.new_zeros(shape)
    kt, inputs = shape[2], kernel.shape[1]
    if mode == "mean":
        out[:, :inputs] = (kernel / kt).unsqueeze(2)
    elif mode == "centre":
        out[:, :inputs, kt // 2] = kernel
    else:
        raise ValueError(f"unknown inflation mode {mode!r}; valid: 'mean', 'centre'")
    if diff_init == "pixels" and shape[1] > inputs:
        if shape[1] != 2 * inputs:
            raise ValueError(f"diff_init='pixels' needs twice the kernel's {inputs} input channels (pixels, then "
                             f"their differences), got {shape[1]}")
        out[:, inputs:] = out[:, :inputs]
    return out


def video_encoder_from_image_encoder(
    image_encoder: ImageEncoder,
    num_frames: int,
    attention: str = "divided",
    cls_mode: str = "per_frame",
    tubelet_size: int = 1,
    frame_diff: bool = False,
    time_kernel: int = 3,
    diff_init: str = DEFAULT_DIFF_INIT,
) -> VideoEncoder:
    """Inflate an ImageEncoder into a VideoEncoder.

    Spatial weights are copied; the temporal attention and its norm start as copies
    of the spatial ones (as TimeSformer initialises from ImageNet ViTs) but the
    temporal output projection and the time embedding are zero, so the temporal
    branch is a no-op. With ``cls_mode="per_frame"`` (and no joint attention) the
    video encoder then equals the image encoder applied per frame with pooled
    outputs averaged. ``tubelet_size`` k > 1 inflates the 2D patch kernel into a 3D one by
    *mean* inflation (the kernel / k in every time slice, as I3D), so a clip of repeated
    frames embeds exactly as the image does (and, with ``per_frame``, pools to the image
    embedding); moving content is averaged over each tubelet's frames.

    An image encoder with a conv tokenizer (``conv_stem``) gives a video encoder with the same blocks
    (channels and spatial strides), each 3x3 Conv2d placed in the centre time slice of a ``time_kernel``
    x 3 x 3 Conv3d (the other slices zero), BatchNorm statistics and affine terms copied; ``frame_diff``
    adds frame-difference inputs (also over the linear embedding) whose weights start at the pixels' inflated
    weights (``diff_init="pixels"``, the default: TSN's start of its RGB-difference network, so the stem sees
    motion from step one) or at zero (``diff_init="zero"``: the stem starts blind to motion). A still clip has
    zero differences, so what follows for still clips holds either way; for moving clips only with ``"zero"``.
    What holds in eval mode: the stem's time strides (``stem_strides``: 2 in the last blocks while 2 divides k) then
    read every s-th frame, s their product, and the patch embedding (mean-inflated over the k / s steps
    the stem leaves) averages them, so time step t's tokens are the mean of the image encoder's patch
    tokens of frames t*k, t*k + s, ..., t*k + k - s (the image tokens of frame t*k when the stem consumes
    the whole tubelet, as with ``tiny``'s three blocks and k = 4). A still clip therefore embeds exactly as
    its frame; a moving clip, without head gating and with ``per_frame``, as the mean of the image encoder
    over those frame averages. In training mode BatchNorm normalises with the clip batch's statistics.
    """
    if not isinstance(image_encoder, ImageEncoder):
        raise TypeError(f"expected an ImageEncoder, got {type(image_encoder).__name__}")
    check_diff_init(diff_init)
    fields = asdict(image_encoder.cfg)
    image_stem = image_encoder.cfg.conv_stem
    channels = image_stem.channels if isinstance(image_stem, ConvStemConfig) else ()
    fields["conv_stem"] = ConvStemConfig(channels, frame_diff, time_kernel) if channels or frame_diff else 0
    cfg = VideoEncoderConfig(**fields, num_frames=num_frames, attention=attention, cls_mode=cls_mode,
                             tubelet_size=tubelet_size)
    video = VideoEncoder(cfg).to(image_encoder.pos_embed.device)
    state = {k: v.detach().clone() for k, v in image_encoder.state_dict().items()}
    own = video.state_dict()
    for key in own:
        match = re.match(r"^blocks\.(\d+)\.temporal_(norm|attn)\.(.+)$", key)
        if match:
            i, part, rest = match.groups()
            state[key] = state[f"blocks.{i}.{'norm1' if part == 'norm' else 'attn'}.{rest}"].clone()
        elif key.startswith("blocks.") and ".temporal_proj." in key or key == "time_embed":
            state[key] = torch.zeros_like(own[key])
        elif own[key].dim() == 5:  # a stem convolution (centre slice) or the 3D patch embedding (mean)
            state[key] = inflate_kernel(state[key], own[key].shape, "mean" if key == "patch_embed.weight" else "centre",
                                        diff_init)
    load_strict(video, state)
    return video
