"""One pre-norm block of the shared backbone: attention + dense or MoE feed-forward.

Layout and names follow open_clip's ``ResidualAttentionBlock`` (``ln_1``, ``attn``,
``ln_2``, ``mlp.fc`` / ``mlp.proj`` for ``c_fc`` / ``c_proj``) so CLIP text weights copy
one to one; with all gates 1.0 the block computes exactly what open_clip's does.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from encoders.attention import MultiHeadAttention

from .modality import NUM_MODALITIES
from .moe import DenseMLP, MoEConfig, MoEFeedForward, MoEOutput


def check_gate_init(gate_init: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(g) for g in gate_init)
    if len(values) != NUM_MODALITIES:
        raise ValueError(f"gate_init needs one value per modality (text, image, video), got {gate_init!r}")
    return values


def routing_output(mlp: MoEFeedForward, h: torch.Tensor, modality_ids: torch.Tensor,
                   real_mask: torch.Tensor | None) -> MoEOutput:
    """``mlp(h, modality_ids, real_mask)`` without running the experts.

    The router logits, auxiliary losses and routing statistics are those of the full call
    (they depend on the router only); ``output`` is a zero tensor (an expanded view), for a
    caller that multiplies it by a zero gate. Both MoE layers (float and int8) provide it.
    """
    return mlp.routing_output(h, modality_ids, real_mask)


class BackboneBlock(nn.Module):
    """x + g * attn(ln_1(x)); then x + g * ffn(ln_2(x)), g = this block's gate of each token's modality.

    Closed-gate shortcut (exact): without autograd (``torch.no_grad`` / ``inference_mode``),
    when every token's gate is exactly 0 (a from_open_clip model at init, on an image- or
    video-only batch) the block leaves x unchanged, so the attention and the feed-forward are
    not run; an MoE block still routes ``ln_2(x)`` so its router logits, losses and statistics
    are those of the full block. ``skip_closed = False`` turns the shortcut off.

    Args:
        width: model width D.  num_heads: attention heads.
        mlp_hidden: dense MLP hidden width.  activation: ``gelu`` | ``quick_gelu`` | ...
        moe: None for a dense feed-forward, else the MoE layer's config.
        gate_init: initial residual gate per modality (text, image, video).
        attn_impl: ``fused`` | ``eager``.  ln_eps: LayerNorm epsilon.

    ``forward(x (B,L,D), modality_ids (B,L), attn_mask=None, real_mask=None (B,L) True = real)``
    returns ``(x (B,L,D), MoEOutput or None)``.
    """

    def __init__(self, width: int, num_heads: int, mlp_hidden: int, activation: str = "gelu",
                 moe: MoEConfig | None = None, gate_init: Sequence[float] = (1.0, 1.0, 1.0),
                 attn_impl: str = "fused", ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = MultiHeadAttention(width, num_heads, qkv_bias=True, proj_bias=True, attn_impl=attn_impl)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp: nn.Module
        if moe is None:
            self.mlp = DenseMLP(width, mlp_hidden, activation)
        else:
            self.mlp = MoEFeedForward.from_config(width, moe)
        self.gate = nn.Parameter(torch.tensor(check_gate_init(gate_init)))
        self.skip_closed = True

    def is_closed_for(self, modality_ids: torch.Tensor) -> bool:
        """True when the shortcut applies: no autograd and a zero gate for every token."""
        return self.skip_closed and not torch.is_grad_enabled() and not bool(self.gate[modality_ids].any())

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEFeedForward)

    def load_dense_mlp_(self, dense_mlp: Any, noise_std: float = 0.0) -> None:
        """Copy a dense MLP (DenseMLP, open_clip ``mlp`` Sequential, or weight dict) into ``mlp``.

        Dense blocks copy the weights; MoE blocks copy them into every expert (upcycling).
        """
        if self.is_moe:
            self.mlp.fill_from_dense_(dense_mlp, noise_std)
            return
        from .moe.upcycle import read_dense_mlp

        spec = read_dense_mlp(dense_mlp)
        if spec["kind"] != "mlp" or spec["activation"] != self.mlp.activation:
            raise ValueError(f"dense MLP ({spec['kind']}, {spec['activation']}) does not match this block's "
                             f"(mlp, {self.mlp.activation})")
        with torch.no_grad():
            for name, linear in (("fc", self.mlp.fc), ("proj", self.mlp.proj)):
                w, b = spec[f"{name}_weight"], spec[f"{name}_bias"]
                if tuple(w.shape) != tuple(linear.weight.shape):
                    raise ValueError(f"dense {name} weight {tuple(w.shape)} != {tuple(linear.weight.shape)}")
                linear.weight.copy_(w)
                linear.bias.copy_(b) if b is not None else linear.bias.zero_()

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor, attn_mask: torch.Tensor | None = None,
                real_mask: torch.Tensor | None = None, routing: bool = True) -> tuple[torch.Tensor, MoEOutput | None]:
        """``routing=False``: a closed block (see ``is_closed_for``) skips its router too and returns
        None for the MoE output (for callers that want embeddings only)."""
        if self.is_closed_for(modality_ids):
            if not (self.is_moe and routing):
                return x, None
            return x, routing_output(self.mlp, self.ln_2(x), modality_ids, real_mask)
        g = self.gate[modality_ids].unsqueeze(-1).to(x.dtype)
        x = x + g * self.attn(self.ln_1(x), attn_mask=attn_mask)
        h = self.ln_2(x)
        if self.is_moe:
            moe_out = self.mlp(h, modality_ids, real_mask)
            return x + g * moe_out.output, moe_out
        return x + g * self.mlp(h), None
