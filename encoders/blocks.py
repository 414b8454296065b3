"""Pre-norm transformer block with optional window attention and head gating."""
from __future__ import annotations

import torch
from torch import nn

from .activations import ActLike, create_act
from .attention import MultiHeadAttention
from .gating import HeadGate, HeadGateOutput
from .windows import window_attention


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 on (..., C)."""

    def __init__(self, dim: int, hidden: int, act: ActLike = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = create_act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (timm / open_clip ``ls_init_value``)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x)) on (B, L, C) with L = num_prefix + gh*gw.

    Args:
        dim, num_heads, mlp_dim: widths.
        qkv_bias, proj_bias: attention biases.
        norm_eps: LayerNorm epsilon.
        act: MLP activation ("gelu", "gelu_tanh", "quick_gelu").
        attn_impl: "fused" or "eager".
        window_size: None for global attention, else the side of the local windows.
        head_gating: add a ``HeadGate``; ``head_topk`` / ``gate_threshold`` configure it.
        ls_init: None, or the initial LayerScale value.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        attn_impl: str = "fused",
        window_size: int | None = None,
        head_gating: bool = False,
        head_topk: int | None = None,
        gate_threshold: float = 0.0,
        ls_init: float | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias, proj_bias, attn_impl)
        self.gate = HeadGate(dim, num_heads, head_topk, gate_threshold) if head_gating else None
        self.ls1 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, act)
        self.ls2 = LayerScale(dim, ls_init) if ls_init is not None else nn.Identity()

    def compute_gate(self, h: torch.Tensor, group: int = 1) -> HeadGateOutput | None:
        """Gates from normed tokens (B*group, L, C), pooled over each group of rows."""
        if self.gate is None:
            return None
        if group > 1:
            h = h.reshape(h.shape[0] // group, group * h.shape[1], h.shape[2])
        return self.gate(h).expand(group)

    def attention(
        self,
        h: torch.Tensor,
        grid: tuple[int, int],
        gate: HeadGateOutput | None = None,
        num_prefix: int = 1,
    ) -> torch.Tensor:
        """Self-attention of normed tokens (B, L, C) -> (B, L, C), windowed / gated as configured."""
        attend = None
        if self.window_size is not None:
            ws, base = self.window_size, self.attn.attend

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return window_attention(q, k, v, grid, ws, base, num_prefix)

        if gate is not None and not bool(gate.keep.any(dim=0).all()):
            # some heads are dropped by every sample: compute only the others
            return self.attn.forward_selected(h, gate.keep, gate.gate, attend=attend)
        head_gate = None if gate is None else gate.gate * gate.keep
        if attend is None:
            return self.attn(h, head_gate=head_gate)
        q, k, v = self.attn.split_heads(h)
        return self.attn.merge_heads(attend(q, k, v), head_gate)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_prefix(self, x: torch.Tensor, num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output for the first ``num_prefix`` (class) tokens only: (B, L, C) -> (B, P, C).

        Equal (up to float rounding) to ``forward(x, grid)[0][:, :num_prefix]``: the keys and
        values come from every token, but the output projection and the MLP run for the
        prefix rows only. Prefix tokens attend globally in windowed blocks too.
        """
        h = self.norm1(x)
        gate = self.compute_gate(h)
        q, k, v = self.attn.split_heads(h)
        out = self.attn.attend(q[:, :, :num_prefix], k, v)
        head_gate = None if gate is None else gate.gate * gate.keep
        x = x[:, :num_prefix] + self.ls1(self.attn.merge_heads(out, head_gate))
        return self.mlp_residual(x), None if gate is None else gate.active_ratio

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, C) -> (B, L, C) and the active-head ratio (scalar tensor, None without gating)."""
        h = self.norm1(x)
        gate = self.compute_gate(h)
        x = x + self.ls1(self.attention(h, grid, gate))
        return self.mlp_residual(x), None if gate is None else gate.active_ratio
