"""Sparse upcycling from dense MLPs, and parity with transformers' MixtralSparseMoeBlock."""
from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from ernie_vl.moe import DenseMLP, DenseSwiGLU, MoEFeedForward

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.configuration_mixtral import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)


def _open_clip_mlp(d=16, h=40):
    from collections import OrderedDict

    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, h)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(h, d))]))


@pytest.mark.parametrize("source", ["dense_mlp", "open_clip", "dict", "swiglu"])
def test_upcycled_layer_equals_dense_at_init(source):
    if source == "dense_mlp":
        dense = DenseMLP(16, 40, "gelu")
    elif source == "open_clip":
        dense = _open_clip_mlp()
    elif source == "swiglu":
        dense = DenseSwiGLU(16, 40)
    else:
        ref = DenseMLP(16, 40, "quick_gelu")
        dense = {"fc_weight": ref.fc.weight, "fc_bias": ref.fc.bias, "proj_weight": ref.proj.weight,
                 "proj_bias": ref.proj.bias, "activation": "quick_gelu"}
    layer = MoEFeedForward.upcycle(dense, num_experts=4, top_k=2, num_shared_experts=1)
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(3, 11, 16)
    expected = (ref if source == "dict" else dense)(x)
    torch.testing.assert_close(layer(x).output, expected, atol=1e-6, rtol=1e-5)


def test_upcycle_noise_breaks_symmetry_but_stays_close():
    dense = DenseMLP(16, 40)
    layer = MoEFeedForward.upcycle(dense, num_experts=4, top_k=2, noise_std=0.01)
    w1 = layer.experts.w1
    assert not torch.equal(w1[0], w1[1])
    torch.testing.assert_close(w1[0], dense.fc.weight, atol=0.05, rtol=0.05)
    x = torch.randn(20, 16)
    assert not torch.equal(layer(x).output, dense(x))
    torch.testing.assert_close(layer(x).output, dense(x), atol=0.05, rtol=0.05)


def test_upcycle_rejects_mismatches():
    with pytest.raises(TypeError, match="cannot upcycle"):
        MoEFeedForward.upcycle(nn.Linear(4, 4), num_experts=2)
    with pytest.raises(ValueError, match="hidden"):
        MoEFeedForward.upcycle(DenseMLP(16, 40), num_experts=2, hidden=8)
    layer = MoEFeedForward(16, 32, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="shape"):
        layer.fill_from_dense_(DenseMLP(16, 40))
    with pytest.raises(ValueError, match="activation"):
        layer.fill_from_dense_(DenseMLP(16, 32, "quick_gelu"))


def _mixtral_block(num_experts=4, top_k=2) -> MixtralSparseMoeBlock:
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=num_experts,
                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=32)
    cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.3)
    return block


@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (8, 2), (4, 1)])
def test_from_mixtral_matches_output_and_router_logits(num_experts, top_k):
    block = _mixtral_block(num_experts, top_k)
    layer = MoEFeedForward.from_mixtral(block).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        ref = block(x)
        ref_logits = block.gate(x.reshape(-1, 16))[0]
        out = layer(x)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.router_logits, ref_logits, atol=1e-5, rtol=1e-5)
    # Mixtral's load-balancing loss counts k assignments per token: it is k x ours
    ref_lb = load_balancing_loss_func((ref_logits,), num_experts, top_k)
    torch.testing.assert_close(out.load_balance_loss * top_k, ref_lb, atol=1e-6, rtol=1e-5)


def test_from_mixtral_gradients_match():
    block = _mixtral_block()
    layer = MoEFeedForward.from_mixtral(block)
    x = torch.randn(12, 16)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    block(xb.unsqueeze(0)).sum().backward()
    layer(xa).output.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.experts.w_gate_up.grad, block.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.experts.w_down.grad, block.experts.down_proj.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-4)
