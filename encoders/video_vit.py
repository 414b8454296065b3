"""Space-time ViT video encoder (TimeSformer-style).

Attention modes:
- ``divided``: per block, temporal attention across frames at each patch position
  (its own norm, attention and a zero-initialised output projection), then spatial
  attention within each frame, then the MLP (TimeSformer "divided_space_time").
- ``joint``: one attention over all tokens of the clip.
- ``space_only``: spatial attention within each frame only (no time embedding).

Class-token modes:
- ``shared`` (TimeSformer): one class token; inside spatial attention every frame
  sees a copy and the copies' updates are averaged after each block.
- ``per_frame``: each frame keeps its own class token (in ``divided`` mode the class
  tokens take part in temporal attention like patches); pooled = mean over frames.

Patch embedding: ``tubelet_size`` 1 embeds each frame with the 2D patch convolution
(TimeSformer; exact for HF conversion and image->video inflation); ``tubelet_size`` k > 1
embeds k consecutive frames x patch x patch with one 3D convolution (ViViT / VideoMAE
tubelets), so the very first layer sees local motion and the clip has T/k time steps
(T must be divisible by k). ``conv_stem`` S > 0 puts one 3x3x3 convolution with S channels and a
GELU before the patch embedding. ``conv_stem`` given as a sequence of channels (C1, ..., Cn) or as a
``ConvStemConfig`` / dict (``encoders.video_stem``) is a convolutional tokenizer: n blocks of 3x3x3
(``time_kernel`` x 3 x 3) Conv3d, BatchNorm3d and GELU strided in space and time as far as the patch and tubelet sizes allow,
then one last convolution over what is left of them to the width, optionally fed the frame
differences as well as the pixels (``frame_diff``). The tokens then carry local motion features
rather than raw pixels, which a transformer trained on a few hundred clips does not learn to
extract. Conversion builds encoders without a stem; inflation (``encoders.convert.video_encoder_from_image_encoder``)
builds one exactly where the image encoder has its own (``ImageEncoderConfig.conv_stem``), the image stem
inflated in time, and refuses a video stem the image encoder's linear patch embedding cannot become. Models built from scratch start with a random (trunc-normal
0.02) time embedding so temporal attention can tell the frames apart from step 0;
inflation and conversion overwrite it (zero, or the checkpoint's).

T, H and W are read from the input; the temporal and spatial position embeddings are
resampled when they differ from the configuration (the time embedding has
``num_frames // tubelet_size`` rows). Local window attention applies to
the spatial attention of the first ``local_layers`` blocks (not to ``joint``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .blocks import Block
from .outputs import EncoderOutput
from .video_stem import ConvStemConfig, conv_tokenizer, frame_differences, remaining_patch, stem_strides
from .pos_embed import TEMPORAL_INTERP_MODES, resample_pos_embed_2d, resample_temporal_embed
from .vit import ImageEncoderConfig, VisionTransformerBase, check_pixels

ATTENTION_MODES = ("divided", "joint", "space_only")
CLS_MODES = ("shared", "per_frame")


@dataclass
class VideoEncoderConfig(ImageEncoderConfig):
    """``ImageEncoderConfig`` plus the temporal settings."""

    num_frames: int = 8
    attention: str = "divided"
    cls_mode: str = "shared"
    temporal_interp: str = "linear"
    tubelet_size: int = 1
    # conv_stem (inherited, a sequence or dict becomes a ConvStemConfig): here also an int S > 0, one 3x3x3
    # convolution of S channels, and frame differences and the kernel's time size (``encoders.video_stem``)

    def parse_conv_stem(self, value: object) -> int | ConvStemConfig:
        if isinstance(value, (list, tuple, dict)):
            return ConvStemConfig.parse(value)  # JSON gives lists or dicts
        if not isinstance(value, ConvStemConfig) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"conv_stem must be an int >= 0 (channels; 0 = none), a sequence of channels or a "
                             f"ConvStemConfig / dict, got {value!r}")
        return value

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_frames, int) or self.num_frames <= 0:
            raise ValueError(f"num_frames must be a positive int, got {self.num_frames!r}")
        if not isinstance(self.tubelet_size, int) or self.tubelet_size <= 0:
            raise ValueError(f"tubelet_size must be a positive int, got {self.tubelet_size!r}")
        check_tubelet(self.num_frames, self.tubelet_size, "num_frames")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {self.attention!r}; valid: {', '.join(ATTENTION_MODES)}")
        if self.cls_mode not in CLS_MODES:
            raise ValueError(f"unknown cls_mode {self.cls_mode!r}; valid: {', '.join(CLS_MODES)}")
        if self.temporal_interp not in TEMPORAL_INTERP_MODES:
            raise ValueError(
                f"unknown temporal_interp {self.temporal_interp!r}; valid: {', '.join(TEMPORAL_INTERP_MODES)}"
            )
        if self.attention == "joint" and self.local_layers:
            raise ValueError("local_layers (window attention) needs attention 'divided' or 'space_only', not 'joint'")


def check_tubelet(num_frames: int, tubelet_size: int, what: str = "clip frames T") -> None:
    """Raise ValueError unless ``num_frames`` splits into whole tubelets."""
    if num_frames % tubelet_size:
        raise ValueError(f"{what}={num_frames} is not divisible by tubelet_size={tubelet_size}; "
                         f"use a frame count that is a multiple of {tubelet_size}")


class SpaceTimeBlock(Block):
    """A ``Block`` over clips (B, T, 1+P, C), with an optional temporal attention branch."""

    def __init__(self, attention: str, shared_cls: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = attention
        self.shared_cls = shared_cls
        if attention == "divided":
            dim = kwargs["dim"]
            self.temporal_norm = nn.LayerNorm(dim, eps=kwargs["norm_eps"])
            self.temporal_attn = MultiHeadAttention(
                dim, kwargs["num_heads"], kwargs["qkv_bias"], kwargs["proj_bias"], kwargs["attn_impl"]
            )
            self.temporal_proj = nn.Linear(dim, dim)

    def reset_temporal(self) -> None:
        """Zero the temporal output projection: the temporal branch starts as a no-op."""
        if self.mode == "divided":
            nn.init.zeros_(self.temporal_proj.weight)
            nn.init.zeros_(self.temporal_proj.bias)

    def temporal(self, x: torch.Tensor) -> torch.Tensor:
        """Residual temporal attention across frames at each position of (B, T, 1+P, C)."""
        b, t, n, c = x.shape
        first = 1 if self.shared_cls else 0  # a shared class token skips temporal attention
        seq = x[:, :, first:].permute(0, 2, 1, 3).reshape(b * (n - first), t, c)
        upd = self.temporal_proj(self.temporal_attn(self.temporal_norm(seq)))
        upd = upd.reshape(b, n - first, t, c).permute(0, 2, 1, 3)
        if first:
            return torch.cat([x[:, :, :1], x[:, :, 1:] + upd], dim=2)
        return x + upd

    def spatial(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual attention within each frame; shared class-token updates averaged over frames."""
        b, t, n, c = x.shape
        h = self.norm1(x.reshape(b * t, n, c))
        gate = self.compute_gate(h, group=t)
        upd = self.attention(h, grid, gate).reshape(b, t, n, c)
        if self.shared_cls:
            cls_upd = upd[:, :, :1].mean(dim=1, keepdim=True).expand(b, t, 1, c)
            upd = torch.cat([cls_upd, upd[:, :, 1:]], dim=2)
        return x + self.ls1(upd), None if gate is None else gate.active_ratio

    def joint(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual attention over every token of the clip."""
        b, t, n, c = x.shape
        if self.shared_cls:
            seq = torch.cat([x[:, 0, :1], x[:, :, 1:].reshape(b, t * (n - 1), c)], dim=1)
        else:
            seq = x.reshape(b, t * n, c)
        h = self.norm1(seq)
        gate = self.compute_gate(h)
        upd = self.ls1(self.attention(h, grid, gate))
        if self.shared_cls:
            cls_upd = upd[:, None, :1].expand(b, t, 1, c)
            upd = torch.cat([cls_upd, upd[:, 1:].reshape(b, t, n - 1, c)], dim=2)
        else:
            upd = upd.reshape(b, t, n, c)
        return x + upd, None if gate is None else gate.active_ratio

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, 1+P, C) -> (B, T, 1+P, C) and the active-head ratio (None without gating)."""
        if self.mode == "joint":
            x, ratio = self.joint(x, grid)
        else:
            if self.mode == "divided":
                x = self.temporal(x)
            x, ratio = self.spatial(x, grid)
        return self.mlp_residual(x), ratio


class VideoEncoder(VisionTransformerBase):
    """Space-time ViT. ``forward(clips (B, T, 3, H, W)) -> EncoderOutput``.

    ``tokens``: the class token(s) (1 shared, or T' per time step) then the patches in
    (h, w, t) order, all after the final norm; T' = T / ``tubelet_size`` time steps
    (``EncoderOutput.num_frames``). ``pooled``: the normed class token
    (``shared``), the mean of the per-frame class tokens (``per_frame``), or the mean
    of all patch tokens (``pool="avg"``), then the projection head.
    """

    def __init__(self, cfg: VideoEncoderConfig) -> None:
        if not isinstance(cfg, VideoEncoderConfig):
            raise TypeError(f"VideoEncoder needs a VideoEncoderConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        k, (ph, pw) = cfg.tubelet_size, cfg.patch_size
        channels = cfg.in_chans
        self.stem: nn.Module | None = None
        if isinstance(cfg.conv_stem, ConvStemConfig):
            channels = cfg.conv_stem.input_channels(cfg.in_chans)
            if cfg.conv_stem.channels:
                strides = stem_strides(len(cfg.conv_stem.channels), (ph, pw), k)
                self.stem = conv_tokenizer(channels, cfg.conv_stem.channels, strides, cfg.conv_stem.time_kernel)
                k, ph, pw = remaining_patch((k, ph, pw), strides)  # what the blocks leave to the last convolution
                channels = cfg.conv_stem.channels[-1]
        elif cfg.conv_stem:
            self.stem = nn.Sequential(nn.Conv3d(cfg.in_chans, cfg.conv_stem, 3, padding=1), nn.GELU())
            channels = cfg.conv_stem
        if cfg.tubelet_size > 1 or cfg.conv_stem:
            self.patch_embed = nn.Conv3d(channels, cfg.width, (k, ph, pw), (k, ph, pw), bias=cfg.patch_bias)
        if cfg.attention != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(cfg.num_frames // cfg.tubelet_size, cfg.width))
        else:
            self.register_parameter("time_embed", None)
        self.init_weights()
        if self.time_embed is not None:
            nn.init.trunc_normal_(self.time_embed, std=0.02)
        for block in self.blocks:
            block.reset_temporal()

    def init_weights(self) -> None:
        super().init_weights()
        if isinstance(self.patch_embed, nn.Conv3d):
            nn.init.trunc_normal_(self.patch_embed.weight, std=0.02)
            if self.patch_embed.bias is not None:
                nn.init.zeros_(self.patch_embed.bias)
            if self.cfg.pos_init == "sincos":
                self.init_pos_embed()  # the table's strength follows the 3-D patch embedding

    def embed_clip(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, T, 3, H, W) -> patch tokens with spatial positions (B, T', gh*gw, C), T' = T / tubelet_size."""
        b, t = x.shape[:2]
        k = self.cfg.tubelet_size
        if k == 1 and not self.cfg.conv_stem:
            patches, grid = self.embed_patches(x.flatten(0, 1))
            return patches.reshape(b, t, *patches.shape[1:]), grid
        check_tubelet(t, k)
        x = x.transpose(1, 2)  # (B, 3, T, H, W)
        stem = self.cfg.conv_stem
        # Channels-last memory (B, T, H, W, C strides) is oneDNN's fast layout for the stem's few-channel 3D
        # convolutions on CPU (about 1.5-2x the contiguous layout's speed, forward and backward); same values
        layout = torch.channels_last_3d if self.stem is not None else torch.contiguous_format
        if isinstance(stem, ConvStemConfig) and stem.frame_diff:
            x = frame_differences(x, layout)  # (B, 6, T, H, W): pixels and their change since the previous frame
        if self.stem is not None:
            # (B, S, T, H, W) local space-time features (downsampled by a tokenizer)
            x = self.stem(x.contiguous(memory_format=layout))
        y = self.embed_features(x)  # (B, T', gh, gw, C)
        grid = (y.shape[2], y.shape[3])
        y = y.flatten(2, 3)  # (B, T', gh*gw, C)
        pos = resample_pos_embed_2d(self.pos_embed[1:], self.cfg.grid_size, grid, self.cfg.pos_interp)
        return y + pos.to(y.dtype), grid

    def embed_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, T, H, W) -> (B, T', gh, gw, C) through the patch embedding. Where a tokenizer's strides cover the
        whole patch and tubelet, that is a 1x1x1 convolution: the same sums as one matrix product over the
        channels of the channels-last features, which skips the convolution primitive's overhead (forward and
        backward) on these small maps."""
        pe = self.patch_embed
        if type(pe) is nn.Conv3d and pe.kernel_size == (1, 1, 1) and pe.stride == (1, 1, 1) and pe.groups == 1 \
                and pe.padding == (0, 0, 0):
            return F.linear(x.permute(0, 2, 3, 4, 1), pe.weight.flatten(1), pe.bias)
        return pe(x).permute(0, 2, 3, 4, 1)

    def make_block(self, index: int) -> nn.Module:
        cfg = self.cfg
        return SpaceTimeBlock(cfg.attention, cfg.cls_mode == "shared", **self.block_kwargs(index))

    def forward(self, clips: torch.Tensor) -> EncoderOutput:
        cfg = self.cfg
        x = check_pixels(clips, 5, "(B, T, 3, H, W)", cfg.in_chans, cfg.patch_size, self.pos_embed.dtype)
        b = x.shape[0]
        patches, grid = self.embed_clip(x)
        t, p, c = patches.shape[1:]
        if self.time_embed is not None:
            time = resample_temporal_embed(self.time_embed, t, cfg.temporal_interp)
            patches = patches + time.to(patches.dtype)[None, :, None, :]
        cls = self.class_token().to(patches.dtype).expand(b, t, 1, c)
        x = self.norm_pre(torch.cat([cls, patches], dim=2))
        ratios = []
        for block in self.blocks:
            x, ratio = block(x, grid)
            ratios.append(ratio)
        x = self.norm(x)
        patch_tokens = x[:, :, 1:].permute(0, 2, 1, 3).reshape(b, p * t, c)
        if cfg.cls_mode == "shared":
            prefix = x[:, 0, :1]
            cls_out = prefix[:, 0]
        else:
            prefix = x[:, :, 0]
            cls_out = prefix.mean(dim=1)
        pooled = self.pool_and_project(cls_out, patch_tokens)  # the head is affine: mean commutes
        return EncoderOutput(
            tokens=torch.cat([prefix, patch_tokens], dim=1),
            pooled=pooled,
            active_head_ratio=self.stack_ratios(ratios),
            grid=grid,
            num_frames=t,
            num_prefix_tokens=prefix.shape[1],
        )
