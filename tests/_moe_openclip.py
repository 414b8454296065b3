"""Copy open_clip text-transformer weights into a SharedBackbone (test helper)."""
from __future__ import annotations

import torch

from ernie_vl.backbone import SharedBackbone


@torch.no_grad()
def copy_open_clip_transformer(backbone: SharedBackbone, oc_transformer) -> None:
    """open_clip ``Transformer`` (resblocks) -> backbone blocks; MoE blocks are upcycled."""
    for block, res in zip(backbone.blocks, oc_transformer.resblocks, strict=True):
        block.ln_1.load_state_dict(res.ln_1.state_dict())
        block.ln_2.load_state_dict(res.ln_2.state_dict())
        block.attn.qkv.weight.copy_(res.attn.in_proj_weight)
        block.attn.qkv.bias.copy_(res.attn.in_proj_bias)
        block.attn.proj.weight.copy_(res.attn.out_proj.weight)
        block.attn.proj.bias.copy_(res.attn.out_proj.bias)
        block.load_dense_mlp_(res.mlp)
