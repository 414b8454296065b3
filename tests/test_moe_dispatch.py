"""Capacity dispatch with known drops, modality-isolated routing, shared experts."""
from __future__ import annotations

import pytest
import torch

from ernie_vl.modality import IMAGE, TEXT, VIDEO
from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.dispatch import expert_capacity, plan_dispatch

from _moe_helpers import kept_assignments, reference_output

D = 8


def _forced_layer(logits_per_token: list[list[float]], **kw) -> tuple[MoEFeedForward, torch.Tensor]:
    """A layer whose router gives token n exactly ``logits_per_token[n]`` for x = one-hot(n)."""
    n, e = len(logits_per_token), len(logits_per_token[0])
    layer = MoEFeedForward(D, hidden=12, num_experts=e, **kw)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :n] = torch.tensor(logits_per_token).t()
    return layer, torch.eye(n, D)


def test_capacity_drops_known_overflow_top1():
    # tokens 0..4 want expert 0, token 5 wants expert 1; capacity = ceil(1.0 * 6 * 1 / 2) = 3
    layer, x = _forced_layer([[5.0, 0.0]] * 5 + [[0.0, 5.0]], top_k=1, dispatch="capacity",
                             capacity_factor=1.0, eval_capacity_factor=2.0)
    layer.train()
    assert layer.capacity(6) == 3
    out = layer(x)
    assert int(out.stats.dropped_tokens) == 2
    assert out.stats.tokens_per_expert.tolist() == [5, 1]
    keep = torch.tensor([[True], [True], [True], [False], [False], [True]])
    assert torch.equal(kept_assignments(layer, x), keep)
    torch.testing.assert_close(out.output, reference_output(layer, x), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.output[3:5], torch.zeros(2, D))  # dropped: only the residual is left
    assert float(out.stats.activated_param_ratio) == pytest.approx(4 / 6 / 2)
    layer.eval()  # eval factor 2.0 -> capacity 6, nothing dropped
    out_eval = layer(x)
    assert int(out_eval.stats.dropped_tokens) == 0
    torch.testing.assert_close(out_eval.output, reference_output(layer, x), atol=1e-6, rtol=1e-6)


def test_capacity_serves_first_choices_before_second_choices():
    # capacity = ceil(1.0 * 4 * 2 / 4) = 2; expert 0 is wanted by token 0 (1st), token 1 (2nd),
    # token 2 (1st): token 1's second choice is the one dropped although token 1 comes earlier.
    layer, x = _forced_layer([[3.0, 2.0, 0.0, 0.0],
                              [2.0, 3.0, 0.0, 0.0],
                              [3.0, 0.0, 2.0, 0.0],
                              [0.0, 0.0, 3.0, 2.0]], top_k=2, dispatch="capacity", capacity_factor=1.0)
    layer.train()
    out = layer(x)
    assert int(out.stats.dropped_tokens) == 1
    keep = torch.ones(4, 2, dtype=torch.bool)
    keep[1, 1] = False
    assert torch.equal(kept_assignments(layer, x), keep)
    torch.testing.assert_close(out.output, reference_output(layer, x), atol=1e-6, rtol=1e-6)


def test_plan_dispatch_orders_rows_by_expert():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = plan_dispatch(experts, 3)
    assert plan.counts == [2, 2, 2]
    assert plan.token_index.tolist() == [1, 0, 1, 2, 0, 2]
    capped = plan_dispatch(experts, 3, capacity=1)
    assert capped.counts == [1, 1, 1] and int(capped.dropped) == 3
    assert capped.token_index.tolist() == [1, 1, 0]
    assert expert_capacity(10, 2, 4, 1.25) == 7


def test_isolated_routing_keeps_modalities_on_their_experts():
    layer = MoEFeedForward(D, hidden=12, num_experts=6, top_k=2, routing="isolated", num_text_experts=2,
                           num_shared_experts=1)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
    x = torch.randn(30, D)
    ids = torch.tensor([TEXT, IMAGE, VIDEO] * 10)
    out = layer(x, ids)
    usage = out.stats.usage_by_modality
    assert usage[TEXT, 2:].sum() == 0 and usage[TEXT, :2].sum() == pytest.approx(1.0)
    assert usage[IMAGE, :2].sum() == 0 and usage[VIDEO, :2].sum() == 0
    assert float(out.stats.overlap_rate) == 0.0
    torch.testing.assert_close(out.output, reference_output(layer, x, ids), atol=1e-5, rtol=1e-5)
    # load balance per group: E_g * sum f_e P_e over the group's tokens, weighted by token share
    probs = layer.router.route(out.router_logits, 2, ids).probs
    chosen = layer.router.route(out.router_logits, 2, ids).experts
    expected = 0.0
    for rows, experts in ((ids == TEXT, slice(0, 2)), (ids != TEXT, slice(2, 6))):
        f = torch.bincount(chosen[rows].reshape(-1), minlength=6).float() / chosen[rows].numel()
        p = probs[rows].mean(0)
        n_e = experts.stop - experts.start
        expected = expected + rows.float().mean() * n_e * (f * p)[experts].sum()
    torch.testing.assert_close(out.load_balance_loss, expected)
    with pytest.raises(ValueError, match="modality_ids"):
        layer(x)
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(D, 12, num_experts=6, top_k=3, routing="isolated", num_text_experts=2)


def test_shared_routing_sends_modalities_anywhere_and_overlap_is_high_at_init():
    layer = MoEFeedForward(D, hidden=12, num_experts=4, top_k=2)
    x = torch.randn(400, D)
    ids = torch.tensor([TEXT, IMAGE] * 200)
    stats = layer(x, ids).stats
    assert 0.7 < float(stats.overlap_rate) <= 1.0
    assert stats.usage_by_modality[IMAGE].gt(0).all()


def test_shared_experts_add_a_dense_path_for_every_token():
    layer = MoEFeedForward(D, hidden=12, num_experts=4, top_k=2, num_shared_experts=2)
    x = torch.randn(9, D)
    out = layer(x).output
    assert layer.shared.fc.out_features == 24
    routed_only = reference_output(layer, x) - layer.shared(x)
    torch.testing.assert_close(out - layer.shared(x), routed_only, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, routed_only)


def test_capacity_mode_gradients_match_reference_with_drops():
    torch.manual_seed(1)
    layer = MoEFeedForward(D, hidden=12, num_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
    layer.train()
    x = torch.randn(24, D, requires_grad=True)
    out = layer(x)
    assert int(out.stats.dropped_tokens) > 0
    # which assignments were kept, recomputed independently: serve (slot, token) order per expert
    decision = layer.router.route(layer.router.logits(x), 2)
    cap = layer.capacity(24)
    keep = torch.zeros(24, 2, dtype=torch.bool)
    used = [0] * 4
    for j in range(2):
        for n in range(24):
            e = int(decision.experts[n, j])
            if used[e] < cap:
                keep[n, j], used[e] = True, used[e] + 1
    assert int(out.stats.dropped_tokens) == int((~keep).sum())
    assert torch.equal(kept_assignments(layer, x.detach()), keep)
    ref = reference_output(layer, x)
    torch.testing.assert_close(out.output, ref, atol=1e-6, rtol=1e-5)
    params = [x, layer.router.weight, layer.experts.w1, layer.experts.b2]
    ours = torch.autograd.grad(out.output.pow(2).sum(), params)
    theirs = torch.autograd.grad(ref.pow(2).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mixed_dtype_input_runs_in_the_expert_dtype():
    layer = MoEFeedForward(D, hidden=12, num_experts=4, top_k=2)
    x = torch.randn(10, D)
    out = layer(x.to(torch.bfloat16)).output
    assert out.dtype == torch.bfloat16
    ref = layer(x.to(torch.bfloat16).float()).output.to(torch.bfloat16)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert reference_output(layer, x.to(torch.bfloat16)).dtype == torch.bfloat16  # the spec casts the same way
    torch.testing.assert_close(reference_output(layer, x.to(torch.bfloat16)), ref, atol=1e-2, rtol=1e-2)
