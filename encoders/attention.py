"""Multi-head self-attention with a fused (SDPA) and an eager path.

Shared by the image / video encoders and the ``ernie_vl`` backbone. The packed
``qkv`` projection matches open_clip's ``in_proj`` / timm's ``qkv`` layout, so
weights map one to one.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("fused", "eager")

#: ``(q, k, v) -> out`` on (B, H, L, Dh) tensors; lets callers swap in windowed attention.
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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

    def forward_selected(
        self,
        x: torch.Tensor,
        head_keep: torch.Tensor,
        head_gate: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        attend: AttendFn | None = None,
    ) -> torch.Tensor:
        """Attention that skips the heads no sample keeps.

        Equal to ``forward(x, attn_mask, head_gate * head_keep)``, but the q/k/v
        projection, the attention and the output projection run only for the heads
        that at least one sample of the batch keeps (one sliced matmul each); a head
        kept by some samples only is zeroed for the others. With one sample, or with
        samples that agree on their heads, dropping heads (``head_topk``) saves
        their share of the attention compute.

        Args:
            x: (B, L, C).
            head_keep: (B, H) bool, which heads each sample uses.
            head_gate: None or (B, H) multipliers for the kept heads.
            attn_mask: None or a mask as for ``forward`` (no per-head dimension).
            attend: optional ``(q, k, v) -> out`` replacing plain attention
                (e.g. windowed attention).
        returns (B, L, C).
        """
        b, n, c = x.shape
        if head_keep.shape != (b, self.num_heads) or head_keep.dtype != torch.bool:
            raise ValueError(
                f"head_keep must be a bool tensor of shape {(b, self.num_heads)}, "
                f"got {tuple(head_keep.shape)} {head_keep.dtype}"
            )
        heads = head_keep.any(dim=0).nonzero().flatten()
        k_heads, dh = heads.numel(), self.head_dim
        weight = head_keep.to(x.dtype) if head_gate is None else head_gate.to(x.dtype) * head_keep
        if k_heads == 0:
            out = x.new_zeros(b, n, c)
            return out + self.proj.bias if self.proj.bias is not None else out
        if type(self.qkv) is not nn.Linear or type(self.proj) is not nn.Linear:
            # A replaced projection (int8, fake-quant) has no float weight to slice: run it
            # whole through its own forward and zero the dropped heads.
            q, k, v = self.split_heads(x)
            out = attend(q, k, v) if attend is not None else self.attend(q, k, v, attn_mask)
            return self.merge_heads(out, weight)
        w_qkv = self.qkv.weight.view(3, self.num_heads, dh, c).index_select(1, heads).reshape(3 * k_heads * dh, c)
        b_qkv = None
        if self.qkv.bias is not None:
            b_qkv = self.qkv.bias.view(3, self.num_heads, dh).index_select(1, heads).reshape(-1)
        qkv = F.linear(x, w_qkv, b_qkv).reshape(b, n, 3, k_heads, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v) if attend is not None else self.attend(q, k, v, attn_mask)
        out = out * weight.index_select(1, heads)[:, :, None, None]
        w_proj = self.proj.weight.view(c, self.num_heads, dh).index_select(1, heads).reshape(c, k_heads * dh)
        return F.linear(out.transpose(1, 2).reshape(b, n, k_heads * dh), w_proj, self.proj.bias)
