"""The shared backbone that text tokens and aligned visual tokens both pass through."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .backbone_block import BackboneBlock, check_gate_init
from .modality import NUM_MODALITIES
from .moe import MoEConfig, RoutingStats
from .moe.layer import check_modality_ids


@dataclass
class BackboneConfig:
    """Config of :class:`SharedBackbone` (same names as its arguments).

    ``moe`` may be given as a dict (JSON presets); it becomes a :class:`MoEConfig`.
    """

    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_hidden: int | None = None
    activation: str = "gelu"
    moe_every: int = 2
    moe: MoEConfig | None = None
    gate_init: tuple[float, ...] = (1.0, 1.0, 1.0)
    modality_embed: bool = True
    attn_impl: str = "fused"
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.gate_init = check_gate_init(self.gate_init)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackboneOutput:
    """hidden: (B, L, D) (no final norm); aux_loss: () sum of the MoE layers' weighted aux losses;
    load_balance_loss / z_loss / orthogonal_loss: () unweighted sums over MoE layers;
    layer_stats: one RoutingStats per MoE layer; router_logits: one (B*L, E) per MoE layer;
    activated_param_ratio: () parameters used per real token over all backbone parameters.
    """

    hidden: torch.Tensor
    aux_loss: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    orthogonal_loss: torch.Tensor
    layer_stats: list[RoutingStats] = field(default_factory=list)
    router_logits: list[torch.Tensor] = field(default_factory=list)
    activated_param_ratio: torch.Tensor | None = None


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool, True where query i may attend key j (j <= i), as CLIP's text encoder."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def merge_padding_mask(attn_mask: torch.Tensor | None, padding_mask: torch.Tensor | None,
                       length: int) -> torch.Tensor | None:
    """Combine an attention mask with a (B, L) key padding mask (True = pad).

    Returns None, the mask unchanged (no padding), or a (B, 1, L, L) mask in which no query
    attends a padding key; every query may attend itself, so a padding query never has an
    empty row (its output is ignored; real queries never see padding).
    """
    if padding_mask is None:
        return attn_mask
    key_ok = ~padding_mask[:, None, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=padding_mask.device)
    if attn_mask is None:
        return key_ok | eye
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.unsqueeze(1)
    if attn_mask.dtype == torch.bool:
        return (attn_mask & key_ok) | eye
    return attn_mask.masked_fill(~key_ok & ~eye, float("-inf"))


class SharedBackbone(nn.Module):
    """Pre-norm transformer over mixed text / image / video tokens; MoE every ``moe_every`` blocks.

    Block i (0-based) is MoE when ``moe_every > 0 and (i + 1) % moe_every == 0`` (so
    ``moe_every=2`` makes blocks 1, 3, 5, ... MoE, ``1`` all, ``0`` none).
    Modality type embeddings (zero-initialised, ``modality_embed=False`` removes them) are
    added to the input. Each block has a learnable residual gate per modality
    (``gate_init``); ``(1, 0, 0)`` makes a CLIP-initialised backbone the identity for visual
    tokens. No final norm (the heads own it).

    ``forward(x (B,L,D), modality_ids (B,L), attn_mask=None, padding_mask=None (B,L) True = pad)``
        attn_mask: None, (L, L), (B, L, L) or (B, H, L, L); bool True = may attend, or float
        added to the logits (e.g. :func:`causal_mask` for text). Padding is masked out as a
        key, not routed, and excluded from the MoE losses and statistics.
        -> :class:`BackboneOutput`.
    """

    def __init__(self, width: int = 512, depth: int = 12, num_heads: int = 8, mlp_hidden: int | None = None,
                 activation: str = "gelu", moe_every: int = 2, moe: MoEConfig | dict | None = None,
                 gate_init: tuple[float, ...] = (1.0, 1.0, 1.0), modality_embed: bool = True,
                 attn_impl: str = "fused", ln_eps: float = 1e-5) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if moe_every < 0:
            raise ValueError(f"moe_every must be >= 0 (0 = no MoE), got {moe_every}")
        mlp_hidden = 4 * width if mlp_hidden is None else mlp_hidden
        if isinstance(moe, dict):
            moe = MoEConfig(**moe)
        if moe is None and moe_every > 0:
            moe = MoEConfig(hidden=mlp_hidden, activation=activation)
        self.width, self.depth, self.moe_every = width, depth, moe_every
        self.moe_config = moe
        self.modality_embed = nn.Embedding(NUM_MODALITIES, width) if modality_embed else None
        if self.modality_embed is not None:
            nn.init.zeros_(self.modality_embed.weight)
        self.blocks = nn.ModuleList(
            BackboneBlock(width, num_heads, mlp_hidden, activation,
                          moe if moe_every > 0 and (i + 1) % moe_every == 0 else None,
                          gate_init, attn_impl, ln_eps)
            for i in range(depth)
        )

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> "SharedBackbone":
        return cls(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__})

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [b.mlp for b in self.blocks if b.is_moe]

    def _check_inputs(self, x: torch.Tensor, modality_ids: torch.Tensor,
                      padding_mask: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"x must be (B, L, {self.width}), got {tuple(x.shape)}")
        if modality_ids.shape != x.shape[:2]:
            raise ValueError(f"modality_ids must be {tuple(x.shape[:2])}, got {tuple(modality_ids.shape)}")
        check_modality_ids(modality_ids)
        if padding_mask is not None:
            if padding_mask.shape != x.shape[:2]:
                raise ValueError(f"padding_mask must be {tuple(x.shape[:2])} (True = pad), "
                                 f"got {tuple(padding_mask.shape)}")
            if padding_mask.dtype != torch.bool:
                raise TypeError(f"padding_mask must be bool (True = pad), got {padding_mask.dtype}")

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor, attn_mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, routing: bool = True) -> BackboneOutput:
        """``routing=False`` (embeddings only, no autograd): blocks whose gate is closed for every token
        skip their routers as well, so ``layer_stats`` lists only the MoE layers that ran."""
        self._check_inputs(x, modality_ids, padding_mask)
        if self.modality_embed is not None:
            x = x + self.modality_embed(modality_ids).to(x.dtype)
        mask = merge_padding_mask(attn_mask, padding_mask, x.shape[1])
        real = None if padding_mask is None else ~padding_mask
        zero = x.new_zeros((), dtype=torch.float32)
        aux, lb, z, orth = zero, zero, zero, zero
        stats, logits, routed_layers = [], [], []
        for block in self.blocks:
            x, moe_out = block(x, modality_ids, mask, real, routing=routing)
            if moe_out is not None:
                aux, lb = aux + moe_out.aux_loss, lb + moe_out.load_balance_loss
                z, orth = z + moe_out.z_loss, orth + moe_out.orthogonal_loss
                stats.append(moe_out.stats)
                logits.append(moe_out.router_logits)
                routed_layers.append(block.mlp)
        return BackboneOutput(x, aux, lb, z, orth, stats, logits, self.activated_param_ratio(stats, routed_layers))

    def activated_param_ratio(self, stats: list[RoutingStats], layers: list[nn.Module] | None = None) -> torch.Tensor:
        """Parameters a real token uses (all but unchosen experts) over all parameters.

        ``stats[i]`` belongs to ``layers[i]`` (default: every MoE layer in order)."""
        total = sum(p.numel() for p in self.parameters())
        unused = 0.0
        for layer, s in zip(self.moe_layers if layers is None else layers, stats):
            unused += (1.0 - float(s.activated_param_ratio)) * layer.expert_params()
        return torch.tensor(1.0 - unused / max(total, 1), dtype=torch.float32)
