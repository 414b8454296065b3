"""Multi-head self-attention with a fused (SDPA) and an eager path.

Shared by the image / video encoders and the ``ernie_vl`` backbone. The packed
``qkv`` projection matches open_clip's ``in_proj`` / timm's ``qkv`` layout, so
weights map one to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("fused", "eager")


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; valid: {', '.join(ATTN_IMPLS)}")
    return attn_impl


class MultiHeadAttention(nn.Module):
    """Self-attention over (B, L, C) tokens.

    Args:
        dim: model width C.
        num_heads: number of heads H; ``dim`` must be divisible by it.
        qkv_bias: bias on the packed q/k/v projection.
        proj_bias: bias on the output projection.
        attn_impl: ``"fused"`` (``F.scaled_dot_product_attention``) or ``"eager"``.

    ``forward(x, attn_mask=None, head_gate=None)``:
        x: (B, L, C).
        attn_mask: None, a bool mask broadcastable to (B, H, L, L) where True means
            "may attend", or a float mask of the same shape added to the logits
            (``-inf`` blocks), as ``F.scaled_dot_product_attention`` takes it.
        head_gate: None or (B, H) per-sample, per-head multipliers applied to each
            head's output before the output projection (dynamic head gating).
        returns (B, L, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_impl: str = "fused",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.attn_impl = check_attn_impl(attn_impl)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, C) -> q, k, v each (B, H, L, Dh)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaled dot-product attention on (B, H, L, Dh) tensors -> (B, H, L, Dh)."""
        if self.attn_impl == "fused":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask
        return logits.softmax(dim=-1) @ v

    def merge_heads(self, out: torch.Tensor, head_gate: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, L, Dh) [* gate (B, H)] -> projected (B, L, C)."""
        if head_gate is not None:
            out = out * head_gate.to(out.dtype)[:, :, None, None]
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        head_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(self.attend(q, k, v, attn_mask), head_gate)
