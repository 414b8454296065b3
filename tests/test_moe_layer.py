"""MoEFeedForward: dropless dispatch against the reference dispatch, gradients, losses, padding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ernie_vl.modality import IMAGE, TEXT, VIDEO
from ernie_vl.moe import DenseMLP, MoEFeedForward, MoEOutput, RoutingStats
from ernie_vl.moe.losses import load_balance_loss, router_orthogonal_loss, router_z_loss

from _moe_helpers import reference_output, small_layer as _layer


@pytest.mark.parametrize("expert_type,activation", [("mlp", "gelu"), ("mlp", "quick_gelu"), ("swiglu", "silu")])
def test_dropless_matches_reference_forward_and_backward(expert_type, activation):
    layer = _layer(expert_type=expert_type, activation=activation, num_shared_experts=1)
    x = torch.randn(40, 16, requires_grad=True)
    out = layer(x)
    assert isinstance(out, MoEOutput) and isinstance(out.stats, RoutingStats)
    ref = reference_output(layer, x)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(ref)
    params = [x] + [p for p in layer.parameters()]
    ours = torch.autograd.grad((out.output * g).sum(), params, allow_unused=True)
    theirs = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grad_through_grouped_mlp_without_bias_and_with_frozen_weights():
    layer = _layer(bias=False)
    layer.experts.w1.requires_grad_(False)
    x = torch.randn(12, 16, requires_grad=True)
    out = layer(x).output
    ref = reference_output(layer, x)
    gx, gw2 = torch.autograd.grad(out.sum(), [x, layer.experts.w2])
    rx, rw2 = torch.autograd.grad(ref.sum(), [x, layer.experts.w2])
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw2, rw2, atol=1e-5, rtol=1e-4)


def test_inference_path_equals_training_path():
    layer = _layer()
    x = torch.randn(30, 16)
    with torch.no_grad():
        fast = layer(x).output
    slow = layer(x.clone().requires_grad_(True)).output.detach()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)


def test_result_does_not_depend_on_token_order():
    layer = _layer(num_experts=6, top_k=2)
    x = torch.randn(2, 25, 16)
    out = layer(x).output.reshape(50, 16)
    perm = torch.randperm(50)
    out_perm = layer(x.reshape(50, 16)[perm]).output
    torch.testing.assert_close(out_perm, out[perm], atol=1e-6, rtol=1e-6)


def test_one_expert_moe_equals_dense_mlp():
    dense = DenseMLP(16, 24, "gelu")
    layer = MoEFeedForward.upcycle(dense, num_experts=1, top_k=1)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x).output, dense(x), atol=1e-6, rtol=1e-6)


def test_padding_is_not_routed_and_not_counted():
    layer = _layer()
    x = torch.randn(2, 5, 16)
    ids = torch.tensor([[TEXT] * 5, [IMAGE] * 3 + [TEXT] * 2])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = layer(x, ids, mask)
    x2 = x.clone()
    x2[1, 3:] = 100.0 * torch.randn(2, 16)  # garbage in the padding changes nothing
    out2 = layer(x2, ids, mask)
    torch.testing.assert_close(out.output, out2.output)
    assert torch.equal(out.output[1, 3:], torch.zeros(2, 16))
    assert int(out.stats.num_tokens) == 8
    assert int(out.stats.tokens_per_expert.sum()) == 16
    torch.testing.assert_close(out.load_balance_loss, out2.load_balance_loss)
    # the real tokens alone give the same numbers
    real = x.reshape(10, 16)[mask.reshape(-1)]
    alone = layer(real, ids.reshape(-1)[mask.reshape(-1)])
    torch.testing.assert_close(alone.output, out.output.reshape(10, 16)[mask.reshape(-1)], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alone.load_balance_loss, out.load_balance_loss)
    torch.testing.assert_close(alone.z_loss, out.z_loss)
    assert out.router_logits.shape == (10, 4)


def test_aux_losses_match_their_formulas():
    layer = _layer(load_balance_coef=0.5, z_loss_coef=0.25, orthogonal_coef=2.0)
    x = torch.randn(33, 16)
    out = layer(x)
    logits = x @ layer.router.weight.t()
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices
    f = torch.bincount(top.reshape(-1), minlength=4).float() / top.numel()
    torch.testing.assert_close(out.load_balance_loss, 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits, -1).square().mean())
    w = F.normalize(layer.router.weight, dim=-1)
    torch.testing.assert_close(out.orthogonal_loss, (w @ w.t() - torch.eye(4)).square().mean())
    torch.testing.assert_close(out.aux_loss, 0.5 * out.load_balance_loss + 0.25 * out.z_loss
                               + 2.0 * out.orthogonal_loss)
    torch.testing.assert_close(out.router_logits, logits, atol=1e-6, rtol=1e-6)


def test_loss_values_on_known_cases():
    # perfectly balanced routing with uniform probabilities -> load balance loss 1
    probs = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(load_balance_loss(probs, experts)) == pytest.approx(1.0)
    # everything on expert 0 with probability 1 -> E
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    assert float(load_balance_loss(probs, torch.zeros(4, 1, dtype=torch.long))) == pytest.approx(4.0)
    assert float(router_z_loss(torch.zeros(3, 4))) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    assert float(router_orthogonal_loss(torch.eye(4, 8) * 3.0)) == pytest.approx(0.0)
    # two identical rows of 2: gram off-diagonal 1 at two entries out of 4
    assert float(router_orthogonal_loss(torch.ones(2, 5))) == pytest.approx(0.5)


def test_routing_stats_values():
    layer = _layer()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # feature 0 > 0 -> expert 0 first
        layer.router.weight[1, 0] = -10.0  # feature 0 < 0 -> expert 1 first
        layer.router.weight[2, 1] = 5.0
    x = torch.zeros(6, 16)
    x[:3, 0] = 1.0  # text tokens -> experts 0 and 2
    x[3:, 0] = -1.0  # image tokens -> experts 1 and 2
    x[:, 1] = 1.0
    ids = torch.tensor([TEXT] * 3 + [IMAGE] * 3)
    stats = layer(x, ids).stats
    assert stats.tokens_per_expert.tolist() == [3, 3, 6, 0]
    torch.testing.assert_close(stats.usage_by_modality[TEXT], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(stats.usage_by_modality[IMAGE], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    assert stats.usage_by_modality[VIDEO].sum() == 0
    assert float(stats.overlap_rate) == pytest.approx(0.5)
    assert float(stats.activated_param_ratio) == pytest.approx(0.5)
    assert int(stats.dropped_tokens) == 0
    d = stats.to_dict()
    assert d["tokens_per_expert"] == [3, 3, 6, 0] and d["overlap_rate"] == pytest.approx(0.5)
    assert layer(x[:3], ids[:3]).stats.to_dict()["overlap_rate"] is None  # no visual tokens


def test_activated_param_ratio_counts_shared_experts():
    layer = _layer(num_experts=8, top_k=2, num_shared_experts=1)
    ratio = float(layer(torch.randn(10, 16)).stats.activated_param_ratio)
    per = layer.experts.params_per_expert()
    shared = layer.shared_params()
    assert ratio == pytest.approx((2 * per + shared) / (8 * per + shared))


def test_bad_inputs_raise():
    layer = _layer()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(4, 15))
    with pytest.raises(ValueError, match="modality_ids"):
        layer(torch.randn(4, 16), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="mask must be bool"):
        layer(torch.randn(4, 16), None, torch.ones(4))
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(16, 24, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="dispatch"):
        MoEFeedForward(16, 24, dispatch="random")
    with pytest.raises(TypeError, match="valid options"):
        MoEFeedForward(16, 24, experts=3)


def test_all_padding_batch_gives_zeros_and_zero_losses():
    layer = _layer(expert_type="swiglu", activation="silu")
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = layer(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out.output, torch.zeros(2, 3, 16))
    assert float(out.load_balance_loss) == 0.0 and float(out.z_loss) == 0.0
    assert out.stats.to_dict()["num_tokens"] == 0 and out.stats.to_dict()["overlap_rate"] is None
    out.output.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_idle_expert_gets_zero_gradient():
    layer = _layer()
    with torch.no_grad():
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0  # feature 0 is positive below: expert 3 never chosen
    x = torch.randn(20, 16)
    x[:, 0] = x[:, 0].abs() + 1.0
    x.requires_grad_(True)
    out = layer(x)
    assert int(out.stats.tokens_per_expert[3]) == 0
    ref = reference_output(layer, x)
    params = [x, layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2]
    ours = torch.autograd.grad(out.output.sum(), params)
    theirs = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.equal(ours[1][3], torch.zeros_like(ours[1][3]))


@pytest.mark.parametrize("expert_type,activation", [("mlp", "gelu"), ("swiglu", "silu")])
def test_chunked_inference_equals_training_path(monkeypatch, expert_type, activation):
    import ernie_vl.moe.kernels.fused as fused

    monkeypatch.setattr(fused, "INFERENCE_CHUNK_ROWS", 3)  # several chunks per expert
    layer = _layer(expert_type=expert_type, activation=activation)
    x = torch.randn(25, 16)
    with torch.no_grad():
        fast = layer(x).output
    slow = layer(x.clone().requires_grad_(True)).output.detach()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)
