"""ViT image encoder: patch embedding (linear, or a convolutional tokenizer: ``conv_stem``), class
token, resampled learned positions, pre-norm blocks (local windows below, global above, optional
head gating), final norm, pooling and an optional projection head.

With ``head_gating=False`` and ``local_layers=0`` it is a plain ViT; the
converters in ``encoders.convert`` map open_clip and timm ViTs onto it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import check_attn_impl
from .activations import ACTIVATIONS
from .blocks import Block
from .outputs import EncoderOutput
from .pos_embed import INTERP_MODES, POS_INITS, resample_pos_embed_2d, sincos_pos_embed_2d
from .video_stem import ConvStemConfig, conv_tokenizer, image_conv_stem, remaining_patch, spatial_strides

POOLS = ("cls", "avg")


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass
class ImageEncoderConfig:
    """Configuration of ``ImageEncoder`` (and the spatial part of ``VideoEncoder``).

    open_clip ViT: ``patch_bias=False, pre_norm=True, norm_eps=1e-5, act="gelu"`` (or
    "quick_gelu"), ``embed_dim`` = its output dim. timm ViT: ``patch_bias=True,
    pre_norm=False, norm_eps=1e-6``, ``embed_dim=None``.

    Local→global: the first ``local_layers`` blocks attend within ``window_size`` x
    ``window_size`` windows of patches (the class token attends globally); a patch
    grid that the window does not tile is padded and the padding masked out (see
    ``encoders.windows``), so every input size the patch size allows works.
    Gating: ``head_gating`` adds per-sample head gates (``encoders.gating``);
    ``head_topk`` keeps the k strongest heads per sample and skips the others'
    compute; ``gate_threshold`` drops heads whose gate (in (0, 2), 1 at init) is lower.
    Position init (from scratch only; loaded weights replace it): ``normal`` (timm: std 0.02)
    or ``sincos`` (a 2-D sine-cosine table as in MAE, learned from there, at the strength of
    the patch embeddings at init, so small models start with a usable sense of position).
    Convolutional tokenizer: ``conv_stem`` 0 (default) is the linear patch embedding; a sequence of channels
    (C1, ..., Cn) or a dict ``{"channels": [...]}`` (``encoders.video_stem.ConvStemConfig``) puts n blocks of
    3x3 Conv2d (no bias), BatchNorm2d and GELU before it, stride 2 in the first blocks while 2 divides the
    patch size (``spatial_strides``); the patch embedding then covers what is left of the patch (a 32 px
    image, patch 4, three blocks: strides 2, 2, 1 and a 1x1 patch embedding, 8x8 tokens as without a stem).
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None  # overrides int(width * mlp_ratio)
    qkv_bias: bool = True
    proj_bias: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    norm_eps: float = 1e-6
    act: str = "gelu"
    ls_init: float | None = None
    pool: str = "cls"
    embed_dim: int | None = None  # projection head output; None: no head
    head_bias: bool = False
    attn_impl: str = "fused"
    pos_interp: str = "bicubic"
    pos_init: str = "normal"
    local_layers: int = 0  # the first `local_layers` blocks attend in windows
    window_size: int = 7
    head_gating: bool = False
    head_topk: int | None = None
    gate_threshold: float = 0.0
    conv_stem: int | tuple[int, ...] | ConvStemConfig = 0  # a sequence or dict becomes a ConvStemConfig

    def parse_conv_stem(self, value: object) -> int | ConvStemConfig:
        """``conv_stem`` checked and parsed (the video config accepts more: frame differences, time kernels)."""
        return image_conv_stem(value)

    def __post_init__(self) -> None:
        self.conv_stem = self.parse_conv_stem(self.conv_stem)
        self.image_size = _pair(self.image_size, "image_size")
        self.patch_size = _pair(self.patch_size, "patch_size")
        for name in ("in_chans", "width", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if any(s % p for s, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown act {self.act!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
        if self.pos_init not in POS_INITS:
            raise ValueError(f"unknown pos_init {self.pos_init!r}; valid: {', '.join(POS_INITS)}")
        if self.pos_interp not in INTERP_MODES:
            raise ValueError(f"unknown pos_interp {self.pos_interp!r}; valid: {', '.join(INTERP_MODES)}")
        check_attn_impl(self.attn_impl)
        if not 0 <= self.local_layers <= self.depth:
            raise ValueError(f"local_layers must be in [0, depth={self.depth}], got {self.local_layers}")
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if self.head_topk is not None and not 1 <= self.head_topk <= self.num_heads:
            raise ValueError(f"head_topk must be in [1, num_heads={self.num_heads}], got {self.head_topk}")
        if (self.head_topk is not None or self.gate_threshold > 0) and not self.head_gating:
            raise ValueError("head_topk / gate_threshold need head_gating=True")
        if self.embed_dim is not None and self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive or None, got {self.embed_dim}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.width * self.mlp_ratio)

    @property
    def output_dim(self) -> int:
        return self.embed_dim if self.embed_dim is not None else self.width


def check_pixels(x: torch.Tensor, ndim: int, layout: str, in_chans: int, patch: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Validate a pixel tensor and cast it to ``dtype`` (floats only)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")
    if x.shape[-3] != in_chans:
        raise ValueError(f"expected {in_chans} channels in {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected float pixels (normalised), got dtype {x.dtype}; convert with .float() and normalise")
    h, w = x.shape[-2:]
    if h < patch[0] or w < patch[1] or h % patch[0] or w % patch[1]:
        raise ValueError(f"image size {h}x{w} is not a positive multiple of the patch size {patch[0]}x{patch[1]}")
    return x.to(dtype)


class VisionTransformerBase(nn.Module):
    """Parameters and embedding shared by ``ImageEncoder`` and ``VideoEncoder``."""

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_chans, c, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(c))
        gh, gw = cfg.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1 + gh * gw, c))
        self.norm_pre = nn.LayerNorm(c, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(self.make_block(i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.head = nn.Linear(c, cfg.embed_dim, bias=cfg.head_bias) if cfg.embed_dim is not None else None

    def block_kwargs(self, index: int) -> dict:
        cfg = self.cfg
        return dict(
            dim=cfg.width,
            num_heads=cfg.num_heads,
            mlp_dim=cfg.hidden_dim,
            qkv_bias=cfg.qkv_bias,
            proj_bias=cfg.proj_bias,
            norm_eps=cfg.norm_eps,
            act=cfg.act,
            attn_impl=cfg.attn_impl,
            window_size=cfg.window_size if index < cfg.local_layers else None,
            head_gating=cfg.head_gating,
            head_topk=cfg.head_topk,
            gate_threshold=cfg.gate_threshold,
            ls_init=cfg.ls_init,
        )

    def make_block(self, index: int) -> nn.Module:
        return Block(**self.block_kwargs(index))

    def init_weights(self) -> None:
        """timm-style init: truncated normal (std 0.02) linears, zero biases; gates at 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        self.init_pos_embed()
        for block in self.blocks:
            if block.gate is not None:
                block.gate.reset_parameters()

    @torch.no_grad()
    def init_pos_embed(self) -> None:
        """``pos_init`` normal: trunc-normal std 0.02; sincos: the 2-D table scaled to the patch embedding's std."""
        if self.cfg.pos_init == "normal":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            return
        if self.pos_embed.is_meta:  # shape-only build (parameter counting): no values to scale
            return
        table = sincos_pos_embed_2d(self.cfg.grid_size, self.pos_embed.shape[1])
        fan_in = self.patch_embed.weight[0].numel()
        strength = float(self.patch_embed.weight.std()) * fan_in ** 0.5  # std of a patch embedding of unit pixels
        self.pos_embed[1:].copy_(table * (strength / float(table.std())))
        self.pos_embed[0].zero_()

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, 3, H, W) -> patch tokens with positions (N, gh*gw, C) and the grid."""
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        pos = resample_pos_embed_2d(self.pos_embed[1:], self.cfg.grid_size, grid, self.cfg.pos_interp)
        return x + pos.to(x.dtype), grid

    def class_token(self) -> torch.Tensor:
        """(C,) class token with its position embedding."""
        return self.cls_token + self.pos_embed[0]

    def pool_and_project(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """cls (B, C), patches (B, N, C) after the final norm -> pooled (B, E)."""
        pooled = cls if self.cfg.pool == "cls" else patches.mean(dim=1)
        return self.head(pooled) if self.head is not None else pooled

    @staticmethod
    def stack_ratios(ratios: list[torch.Tensor | None]) -> torch.Tensor | None:
        if not ratios or ratios[0] is None:
            return None
        return torch.stack([r.detach().float() for r in ratios])


class ImageEncoder(VisionTransformerBase):
    """ViT over images. ``forward(images (B, 3, H, W), prefix_only=False) -> EncoderOutput``.

    H and W may differ from ``cfg.image_size`` (positions are resampled) but must be
    multiples of the patch size. Non-float pixels raise TypeError; other float dtypes
    are cast to the parameters' dtype. ``prefix_only=True`` (``pool="cls"`` only) returns
    just the class token, ``tokens`` (B, 1, C): the last block then runs its output
    projection and MLP for that token alone (``Block.forward_prefix``), for callers that
    use nothing else (``ProjectorConfig.tokens = "prefix"``).
    """

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        if not isinstance(cfg, ImageEncoderConfig):
            raise TypeError(f"ImageEncoder needs an ImageEncoderConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        self.stem: nn.Sequential | None = None
        if isinstance(cfg.conv_stem, ConvStemConfig):
            channels = cfg.conv_stem.channels
            strides = spatial_strides(len(channels), cfg.patch_size)
            self.stem = conv_tokenizer(cfg.in_chans, channels, strides)
            left = remaining_patch(cfg.patch_size, strides)
            self.patch_embed = nn.Conv2d(channels[-1], cfg.width, left, left, bias=cfg.patch_bias)
        self.init_weights()

    def init_weights(self) -> None:
        """The ViT's init; the stem's convolutions keep PyTorch's (Kaiming-uniform) init, as the video stem's."""
        super().init_weights()
        if self.stem is not None:
            for m in self.stem.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, 3, H, W) -> patch tokens with positions (N, gh*gw, C) and the grid; through the stem if any."""
        if self.stem is not None:
            # (N, Cn, H / prod strides, W / prod strides). Channels-last memory is oneDNN's fast layout for these
            # few-channel convolutions on CPU (as for the video stem; bench/image_stem_cost.py times both); the
            # values are the same, and the patch embedding's channels-last output flattens to contiguous tokens
            x = self.stem(x.contiguous(memory_format=torch.channels_last))
        return super().embed_patches(x)

    def forward(self, images: torch.Tensor, prefix_only: bool = False) -> EncoderOutput:
        cfg = self.cfg
        if prefix_only and cfg.pool != "cls":
            raise ValueError(f"prefix_only needs pool='cls' (the pooled output is the class token), got {cfg.pool!r}")
        x = check_pixels(images, 4, "(B, 3, H, W)", cfg.in_chans, cfg.patch_size, self.pos_embed.dtype)
        patches, grid = self.embed_patches(x)
        cls = self.class_token().to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = self.norm_pre(torch.cat([cls, patches], dim=1))
        ratios = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, ratio = block.forward_prefix(x, 1) if prefix_only and i == last else block(x, grid)
            ratios.append(ratio)
        x = self.norm(x)
        return EncoderOutput(
            tokens=x,
            pooled=self.pool_and_project(x[:, 0], x[:, 1:]),
            active_head_ratio=self.stack_ratios(ratios),
            grid=grid,
            num_frames=1,
            num_prefix_tokens=1,
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled (B, E), not normalised: open_clip's ``encode_image`` equivalent.

        Computes only what the pooled vector needs: with ``pool="cls"`` the last block runs its
        output projection and MLP for the class token alone (``prefix_only``).
        """
        return self(images, prefix_only=self.cfg.pool == "cls").pooled
