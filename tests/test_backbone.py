"""SharedBackbone: open_clip parity, residual gates, modality embeddings, masks, MoE outputs."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU, Transformer
from torch import nn

from ernie_vl.backbone import BackboneConfig, SharedBackbone, causal_mask
from ernie_vl.modality import IMAGE, TEXT, VIDEO
from ernie_vl.moe import MoEConfig

from _moe_openclip import copy_open_clip_transformer

WIDTH, HEADS = 32, 4


def _oc_transformer(act_layer=nn.GELU) -> Transformer:
    return Transformer(WIDTH, layers=3, heads=HEADS, act_layer=act_layer, batch_first=True).eval()


def _oc_causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


@pytest.mark.parametrize("act_layer,activation", [(nn.GELU, "gelu"), (QuickGELU, "quick_gelu")])
def test_dense_backbone_reproduces_open_clip_text_transformer(act_layer, activation):
    oc = _oc_transformer(act_layer)
    bb = SharedBackbone(WIDTH, 3, HEADS, activation=activation, moe_every=0).eval()
    copy_open_clip_transformer(bb, oc)
    x = torch.randn(2, 7, WIDTH)
    ids = torch.full((2, 7), TEXT)
    with torch.no_grad():
        ref = oc(x, attn_mask=_oc_causal(7))
        out = bb(x, ids, attn_mask=causal_mask(7))
        out_float_mask = bb(x, ids, attn_mask=_oc_causal(7))
    torch.testing.assert_close(out.hidden, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_float_mask.hidden, ref, atol=1e-5, rtol=1e-5)
    assert float(out.aux_loss) == 0.0 and out.layer_stats == []


def test_upcycled_moe_backbone_reproduces_open_clip_at_init():
    oc = _oc_transformer()
    moe = MoEConfig(hidden=4 * WIDTH, num_experts=4, top_k=2)
    bb = SharedBackbone(WIDTH, 3, HEADS, moe_every=1, moe=moe).eval()
    copy_open_clip_transformer(bb, oc)
    x = torch.randn(2, 7, WIDTH)
    with torch.no_grad():
        ref = oc(x, attn_mask=_oc_causal(7))
        out = bb(x, torch.full((2, 7), TEXT), attn_mask=causal_mask(7))
    torch.testing.assert_close(out.hidden, ref, atol=1e-5, rtol=1e-5)
    assert len(out.layer_stats) == 3 and int(out.layer_stats[0].num_tokens) == 14


def test_moe_every_places_moe_blocks():
    bb = SharedBackbone(WIDTH, 4, HEADS, moe_every=2, moe=MoEConfig(hidden=64, num_experts=4))
    assert [b.is_moe for b in bb.blocks] == [False, True, False, True]
    assert len(bb.moe_layers) == 2


def _mixed_batch():
    x = torch.randn(2, 6, WIDTH)
    ids = torch.tensor([[TEXT, TEXT, IMAGE, IMAGE, IMAGE, TEXT], [VIDEO, VIDEO, TEXT, TEXT, TEXT, TEXT]])
    return x, ids


def test_visual_gate_zero_makes_backbone_identity_for_visual_tokens():
    bb = SharedBackbone(WIDTH, 3, HEADS, moe_every=2, moe=MoEConfig(hidden=64, num_experts=4),
                        gate_init=(1.0, 0.0, 0.0))
    x, ids = _mixed_batch()
    out = bb(x, ids).hidden
    visual = ids != TEXT
    assert torch.equal(out[visual], x[visual])
    assert not torch.allclose(out[~visual], x[~visual])


def test_unit_gates_leave_text_bit_exact():
    bb = SharedBackbone(WIDTH, 2, HEADS, moe_every=0).eval()
    x = torch.randn(2, 5, WIDTH)
    ids = torch.full((2, 5), TEXT)
    mask = causal_mask(5)
    with torch.no_grad():
        out = bb(x, ids, attn_mask=mask).hidden
        h = x
        for b in bb.blocks:  # the same block without any gate
            h = h + b.attn(b.ln_1(h), attn_mask=mask)
            h = h + b.mlp(b.ln_2(h))
    assert torch.equal(out, h)


def test_gates_scale_each_modality_and_are_learnable():
    bb = SharedBackbone(WIDTH, 1, HEADS, moe_every=0, gate_init=(1.0, 0.5, 2.0))
    x, ids = _mixed_batch()
    block = bb.blocks[0]
    g = torch.tensor([1.0, 0.5, 2.0])[ids].unsqueeze(-1)
    h = x + g * block.attn(block.ln_1(x))
    ref = h + g * block.mlp(block.ln_2(h))
    out = bb(x, ids).hidden
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert block.gate.grad is not None and torch.all(block.gate.grad != 0)


def test_modality_embeddings_start_at_zero_and_can_be_switched_off():
    bb = SharedBackbone(WIDTH, 1, HEADS, moe_every=0)
    assert torch.equal(bb.modality_embed.weight, torch.zeros(3, WIDTH))
    x, ids = _mixed_batch()
    before = bb(x, ids).hidden
    with torch.no_grad():
        bb.modality_embed.weight[IMAGE] = 1.0
    after = bb(x, ids).hidden
    assert not torch.allclose(before, after)
    off = SharedBackbone(WIDTH, 1, HEADS, moe_every=0, modality_embed=False)
    assert off.modality_embed is None
    assert not any("modality_embed" in k for k in off.state_dict())


def test_padding_is_masked_and_excluded_from_routing():
    moe = MoEConfig(hidden=64, num_experts=4, top_k=2)
    bb = SharedBackbone(WIDTH, 2, HEADS, moe_every=1, moe=moe).eval()
    x, ids = _mixed_batch()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    out = bb(x, ids, padding_mask=pad)
    x2 = x.clone()
    x2[0, 4:] = 50.0
    out2 = bb(x2, ids, padding_mask=pad)
    torch.testing.assert_close(out.hidden[~pad], out2.hidden[~pad])
    torch.testing.assert_close(out.aux_loss, out2.aux_loss)
    assert all(int(s.num_tokens) == 10 for s in out.layer_stats)
    assert torch.isfinite(out.hidden).all()
    # the unpadded prefix alone gives the same hidden states for sample 0
    alone = bb(x[:1, :4], ids[:1, :4])
    torch.testing.assert_close(alone.hidden[0], out.hidden[0, :4], atol=1e-5, rtol=1e-5)


def test_aux_loss_sums_layers_and_backpropagates():
    moe = MoEConfig(hidden=64, num_experts=4, top_k=2, load_balance_coef=0.1, z_loss_coef=0.01)
    bb = SharedBackbone(WIDTH, 4, HEADS, moe_every=2, moe=moe)
    x, ids = _mixed_batch()
    out = bb(x, ids)
    assert len(out.layer_stats) == 2 and len(out.router_logits) == 2
    torch.testing.assert_close(out.aux_loss, 0.1 * out.load_balance_loss + 0.01 * out.z_loss)
    out.aux_loss.backward()
    assert bb.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    ratio = float(out.activated_param_ratio)
    assert 0.0 < ratio < 1.0


def test_config_roundtrip_and_bad_inputs():
    cfg = BackboneConfig(width=WIDTH, depth=2, num_heads=HEADS, moe={"hidden": 64, "num_experts": 4})
    bb = SharedBackbone.from_config(cfg)
    assert isinstance(cfg.moe, MoEConfig) and bb.blocks[1].is_moe
    x, ids = _mixed_batch()
    with pytest.raises(ValueError, match="modality_ids"):
        bb(x, ids[:, :3])
    with pytest.raises(TypeError, match="padding_mask must be bool"):
        bb(x, ids, padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="gate_init"):
        SharedBackbone(WIDTH, 1, HEADS, gate_init=(1.0, 0.0))
    with pytest.raises(ValueError, match="x must be"):
        bb(x[..., :5], ids)
    with pytest.raises(ValueError, match=r"modality_ids must be in \[0, 3\)"):
        bb(x, ids + 3)
    with pytest.raises(TypeError, match="integer"):
        bb(x, ids.float())


def test_float_and_bool_causal_masks_agree_with_padding():
    bb = SharedBackbone(WIDTH, 2, HEADS, moe_every=2, moe=MoEConfig(hidden=64, num_experts=4)).eval()
    x, ids = _mixed_batch()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        a = bb(x, ids, attn_mask=causal_mask(6), padding_mask=pad).hidden
        b = bb(x, ids, attn_mask=_oc_causal(6), padding_mask=pad).hidden
    torch.testing.assert_close(a[~pad], b[~pad], atol=1e-6, rtol=1e-6)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def _closed_gate_backbone() -> SharedBackbone:
    torch.manual_seed(0)
    bb = SharedBackbone(WIDTH, 3, HEADS, moe_every=2, moe=MoEConfig(hidden=64, num_experts=4),
                        gate_init=(1.0, 0.0, 0.0)).eval()
    with torch.no_grad():  # non-zero modality embeddings: the shortcut must keep adding them
        bb.modality_embed.weight.normal_()
    return bb


@pytest.mark.parametrize("modality", [IMAGE, VIDEO])
def test_closed_gate_shortcut_is_exact_and_skips_the_block_work(modality):
    from _quantize_helpers import CallCounter, assert_same_backbone_output

    bb = _closed_gate_backbone()
    x = torch.randn(2, 5, WIDTH)
    ids = torch.full((2, 5), modality)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    attn_calls = CallCounter([b.attn for b in bb.blocks])
    moe_calls = CallCounter(bb.moe_layers)  # routing_output does not call the layer itself
    with torch.no_grad():
        fast = bb(x, ids, padding_mask=padding)
    assert attn_calls.calls == 0 and moe_calls.calls == 0  # the shortcut ran
    with torch.enable_grad():  # autograd on: the full blocks run
        slow = bb(x, ids, padding_mask=padding)
    assert attn_calls.calls == 3 and moe_calls.calls == 1
    assert_same_backbone_output(fast, slow)
    assert torch.equal(fast.hidden, x + bb.modality_embed.weight[modality])
    for block in bb.blocks:  # switched off: the full blocks run under no_grad too, same result
        block.skip_closed = False
    with torch.no_grad():
        assert_same_backbone_output(bb(x, ids, padding_mask=padding), fast)
    assert attn_calls.calls == 6


def test_closed_gate_shortcut_needs_every_gate_zero():
    from _quantize_helpers import CallCounter

    bb = _closed_gate_backbone()
    x, ids = _mixed_batch()  # text tokens have gate 1: the blocks must run
    calls = CallCounter([b.attn for b in bb.blocks])
    with torch.no_grad():
        out = bb(x, ids).hidden
    assert calls.calls == 3
    with torch.no_grad():
        bb.blocks[1].gate[IMAGE] = 1e-6  # one block slightly open for images
        img = torch.full((2, 6), IMAGE)
        calls.calls = 0
        opened = bb(x, img).hidden
    assert calls.calls == 1
    assert not torch.equal(opened, x + bb.modality_embed.weight[IMAGE])
    assert not torch.equal(out[ids == TEXT], x[ids == TEXT])


def test_embeddings_only_call_skips_the_routers_of_closed_blocks():
    bb = _closed_gate_backbone()
    x = torch.randn(2, 5, WIDTH)
    ids = torch.full((2, 5), IMAGE)
    routed = []
    for layer in bb.moe_layers:  # count routing passes (the router is used through route_tokens)
        layer.route_tokens = (lambda f: lambda *a, **k: routed.append(1) or f(*a, **k))(layer.route_tokens)
    with torch.no_grad():
        with_routing = bb(x, ids)
        assert len(routed) == len(bb.moe_layers) == len(with_routing.layer_stats) >= 1
        routed.clear()
        embeddings_only = bb(x, ids, routing=False)
    assert routed == [] and embeddings_only.layer_stats == []
    assert torch.equal(embeddings_only.hidden, with_routing.hidden)
    assert float(embeddings_only.activated_param_ratio) == 1.0  # no routed layer reported
    moe_block = next(b for b in bb.blocks if b.is_moe)
    with torch.no_grad():  # an open block still routes and reports, with routing=False too
        moe_block.gate[IMAGE] = 0.5
        partly_open = bb(x, ids, routing=False)
    assert len(routed) == 1 and len(partly_open.layer_stats) == 1
