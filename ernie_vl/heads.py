"""Alignment projectors (encoder -> backbone), pooling, embedding heads and the logit scale.

Projectors map visual tokens (B, N, C_enc) to backbone width (B, N', D):
``LinearProjector`` and ``MLPProjector`` keep N' = N, ``Resampler`` returns N' = M
learned queries (Perceiver / Q-Former style), so a video's T x N tokens become M;
``ErnieResamplerProjector`` (ERNIE 4.5 VL, :mod:`ernie_vl.resampler`) merges 2 x 2 patches
and frame pairs, N' = T/2 * N/4 (it also takes the grid and frame count).
Every projector's ``forward`` returns ``(tokens, num_prefix)``: how many leading
tokens are class / query tokens, which ``pool_visual(..., "cls")`` averages.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernie_vl.config import ProjectorConfig
from ernie_vl.resampler import ErnieResamplerProjector, VariableResolutionResampler  # noqa: F401 (public here)


class LinearProjector(nn.Module):
    """(B, N, C) -> (B, N, D) with one linear layer."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, tokens: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, int]:
        return self.proj(tokens), num_prefix


class MLPProjector(nn.Module):
    """(B, N, C) -> (B, N, D): Linear -> GELU -> Linear (LLaVA-1.5 style)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, int]:
        return self.fc2(F.gelu(self.fc1(tokens))), num_prefix


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention of queries (B, M, D) over context (B, N, D), then an MLP."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, m, d = queries.shape
        n = context.shape[1]
        h, dh = self.num_heads, d // self.num_heads
        q = self.q(self.norm_q(queries)).reshape(b, m, h, dh).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).reshape(b, n, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, m, d)
        queries = queries + self.out(attended)
        return queries + self.fc2(F.gelu(self.fc1(self.norm_mlp(queries))))


class Resampler(nn.Module):
    """M learned queries cross-attend to N visual tokens: (B, N, C) -> (B, M, D).

    The tokens are first projected to D; the output is the M updated queries, all of
    which count as prefix (query) tokens for pooling.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, num_heads: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_dim, out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * out_dim**-0.5)
        self.blocks = nn.ModuleList(CrossAttentionBlock(out_dim, num_heads, hidden) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, int]:
        context = self.input_proj(tokens)
        queries = self.queries.to(context.dtype).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, context)
        return queries, queries.shape[1]


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The projector named by ``cfg.kind``."""
    hidden = max(1, int(round(cfg.mlp_ratio * out_dim)))
    if cfg.kind == "linear":
        return LinearProjector(in_dim, out_dim)
    if cfg.kind == "mlp":
        return MLPProjector(in_dim, out_dim, hidden)
    if cfg.kind == "resampler":
        return Resampler(in_dim, out_dim, cfg.num_queries, cfg.num_heads, cfg.depth, hidden)
    if cfg.kind == "resampler_ernie45":
        return ErnieResamplerProjector(in_dim, out_dim)
    raise ValueError(f"unknown projector kind {cfg.kind!r}; valid: linear, mlp, resampler, resampler_ernie45")


def pool_text_eot(hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP pooling: the hidden state at the end-of-text token (the largest id). (B,L,D) -> (B,D)."""
    eot = tokens.argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), eot]


def pool_visual(hidden: torch.Tensor, mode: str, num_prefix: int) -> torch.Tensor:
    """(B, L, D) -> (B, D): ``cls`` = mean of the first ``num_prefix`` tokens, ``mean`` = all tokens."""
    if mode == "cls":
        if num_prefix < 1:
            raise ValueError("visual_pool 'cls' needs class or query tokens; this encoder gives none")
        return hidden[:, :num_prefix].mean(dim=1)
    if mode == "mean":
        return hidden.mean(dim=1)
    raise ValueError(f"unknown visual_pool {mode!r}; valid: cls, mean")


class EmbeddingHead(nn.Module):
    """Pooled (B, D) -> embedding (B, E), not normalised: optional LayerNorm, then a linear map."""

    def __init__(self, width: int, embed_dim: int, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(pooled))


class ContrastiveLogits(nn.Module):
    """Learnable temperature (and SigLIP bias) turning cosine similarities into logits.

    ``log_scale`` is learned in log space (CLIP init ``log(1/0.07)``); ``scale()`` is
    ``exp(log_scale)`` clamped at ``max_scale``. ``bias`` exists only for SigLIP
    (init -10), so every parameter receives a gradient from the loss in use.
    """

    def __init__(self, init_scale: float, max_scale: float, init_bias: float | None) -> None:
        super().__init__()
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias))) if init_bias is not None else None

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)
