"""ERNIE 4.5 in our MoE layer: exact converters from transformers, modality groups, the
score-correction bias (aux-loss-free balancing) and norm_min routing."""
from __future__ import annotations

import pytest
import torch

from ernie_vl.modality import IMAGE, TEXT, VIDEO
from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.balance import bias_step, load_cv, update_score_biases
from ernie_vl.moe.router import Router

transformers = pytest.importorskip("transformers")
moe_mod = pytest.importorskip("transformers.models.ernie4_5_moe.modeling_ernie4_5_moe")
vl_mod = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
from transformers.models.ernie4_5_moe.configuration_ernie4_5_moe import Ernie4_5_MoeConfig  # noqa: E402
from transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe import (  # noqa: E402
    Ernie4_5_VLMoeTextConfig,
)


def _draw_all(module: torch.nn.Module, seed: int, bias_std: float = 0.2) -> None:
    """Every parameter random (the score bias too, strong enough to change choices)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = bias_std if "e_score_correction_bias" in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _ernie_text_block(shared: int, seed: int = 0):
    cfg = Ernie4_5_MoeConfig(hidden_size=16, moe_intermediate_size=12, moe_num_experts=6, moe_k=2,
                             moe_num_shared_experts=shared)
    block = moe_mod.Ernie4_5_MoeSparseMoeBlock(cfg).eval()
    _draw_all(block, seed)
    return block


def _ernie_vl_block(shared: int = 2, widths=(12, 8), seed: int = 1):
    cfg = Ernie4_5_VLMoeTextConfig(hidden_size=16, moe_intermediate_size=list(widths), moe_num_experts=4, moe_k=2,
                                   moe_num_shared_experts=shared)
    block = vl_mod.Ernie4_5_VLMoeMoeBlock(cfg).eval()
    _draw_all(block, seed)
    return block


@pytest.mark.parametrize("shared", [0, 2])
def test_from_ernie45_matches_transformers_block(shared):
    block = _ernie_text_block(shared)
    assert block.gate.moe_statics.e_score_correction_bias.abs().min() > 0
    layer = MoEFeedForward.from_ernie45(block).eval()
    assert (layer.shared is None) == (shared == 0) and layer.config.norm_min == pytest.approx(1e-12)
    x = torch.randn(3, 9, 16)
    with torch.no_grad():
        expected = block(x)
        out = layer(x)
        torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)
        logits, _, chosen = block.gate(x.reshape(-1, 16))
        torch.testing.assert_close(out.router_logits, logits, atol=1e-5, rtol=1e-5)
        # the bias matters here: without it the choices (and the output) differ
        layer.router.score_bias.zero_()
        assert not torch.allclose(layer(x).output, expected, atol=1e-4)
        ours_chosen = layer.router.route(layer.router.logits(x.reshape(-1, 16)), 2).experts
        assert not torch.equal(ours_chosen.sort(-1).values, chosen.sort(-1).values)


def test_from_ernie45_vl_matches_transformers_block_and_router_logits():
    block = _ernie_vl_block()
    layer = MoEFeedForward.from_ernie45_vl(block).eval()
    assert layer.config.routing == "groups" and layer.config.group_hidden == (12, 8)
    x = torch.randn(2, 10, 16)
    ids = torch.tensor([[TEXT] * 4 + [IMAGE] * 3 + [VIDEO] * 3, [VIDEO] * 5 + [TEXT] * 5])
    with torch.no_grad():
        expected, expected_logits = block(x, ids)
        out = layer(x, modality_ids=ids)
        torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.router_logits, expected_logits, atol=1e-5, rtol=1e-5)
        text_only = torch.zeros_like(ids)  # transformers' text-only path
        expected_t, logits_t = block(x, text_only)
        out_t = layer(x, modality_ids=text_only)
        torch.testing.assert_close(out_t.output, expected_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_t.router_logits, logits_t, atol=1e-5, rtol=1e-5)
    assert set(out.groups) == {"0:text", "1:vision"} and set(out_t.groups) == {"0:text"}


def test_groups_have_own_sizes_stats_losses_and_gradients():
    layer = MoEFeedForward(16, hidden=24, num_experts=4, top_k=2, routing="groups", group_experts=(4, 6),
                           group_hidden=(24, 8), num_shared_experts=1, expert_type="swiglu", load_balance_coef=0.1)
    assert layer.num_experts == 10 and layer.groups[1].experts.w_down.shape == (6, 16, 8)
    x = torch.randn(2, 8, 16, requires_grad=True)
    ids = torch.tensor([[TEXT] * 3 + [IMAGE] * 5, [VIDEO] * 6 + [TEXT] * 2])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, -1] = False  # one padded text token
    out = layer(x, modality_ids=ids, mask=mask)
    s = out.stats
    assert s.tokens_per_expert.shape == (10,) and int(s.num_tokens) == 15
    assert int(s.tokens_per_expert[:4].sum()) == 4 * 2 and int(s.tokens_per_expert[4:].sum()) == 11 * 2
    assert s.expert_group.tolist() == [0] * 4 + [1] * 6
    assert float(s.overlap_rate) == 0.0  # text and vision never share an expert
    torch.testing.assert_close(s.usage_by_modality[TEXT, :4].sum(), torch.tensor(1.0))
    assert float(s.usage_by_modality[IMAGE, :4].sum()) == 0.0
    assert torch.equal(out.output[1, -1], torch.zeros(16))  # padding gets 0
    # router logits: (N, max E); the text group's rows end in -inf after its 4 experts
    assert out.router_logits.shape == (16, 6)
    text_rows = (ids.reshape(-1) == TEXT)
    assert torch.isinf(out.router_logits[text_rows, 4:]).all() and torch.isfinite(out.router_logits[~text_rows]).all()
    # the layer's losses are the token-weighted mean of the groups'
    lb = sum(g.load_balance_loss * float(g.stats.num_tokens) / 15 for g in out.groups.values())
    torch.testing.assert_close(out.load_balance_loss, lb)
    (out.output.square().sum() + out.aux_loss).backward()
    for g in layer.groups:
        assert g.router.weight.grad.abs().sum() > 0
    # routing_output: same statistics and logits without the experts
    with torch.no_grad():
        ro = layer.routing_output(x, ids, mask)
    assert torch.equal(ro.stats.tokens_per_expert, s.tokens_per_expert)
    torch.testing.assert_close(ro.router_logits, out.router_logits.detach())


def test_group_layout_that_misses_a_modality_fails_with_names_and_sizes():
    layer = MoEFeedForward(16, hidden=8, num_experts=4, routing="groups", group_layout=("text", "image"))
    ids = torch.tensor([[TEXT, IMAGE, VIDEO, VIDEO]])
    with pytest.raises(ValueError, match=r"video \(2 tokens\).*text \(4 experts\), image \(4 experts\)"):
        layer(torch.randn(1, 4, 16), modality_ids=ids)
    with pytest.raises(ValueError, match="modality 1 is in both 'vision' and 'image'"):
        MoEFeedForward(16, hidden=8, num_experts=4, routing="groups", group_layout=("vision", "image"))
    with pytest.raises(ValueError, match=r"group_experts must give one value >= 1 per group .* \(2\), got \[4\]"):
        MoEFeedForward(16, hidden=8, num_experts=4, routing="groups", group_experts=(4,))


def test_bias_shape_must_match_the_experts():
    router = Router(8, 4, score_bias=True)
    with pytest.raises(ValueError, match=r"shape \(5,\) does not match the router's 4 experts"):
        router.set_score_bias(torch.zeros(5))
    router.score_bias = torch.zeros(3)
    with pytest.raises(ValueError, match=r"score_bias has shape \(3,\), but the router has 4 experts"):
        router.route_fused(router.logits(torch.randn(5, 8)), 2)
    with pytest.raises(ValueError, match="no score bias"):
        Router(8, 4).set_score_bias(torch.zeros(4))
    with pytest.raises(ValueError, match=r"score bias has shape \(4,\) but the measured load has \(3,\)"):
        bias_step(torch.zeros(4), torch.ones(3), 0.1)


@pytest.mark.parametrize("isolated,temperature,norm_min", [(False, 1.0, 1e-12), (True, 1.0, 0.0), (False, 0.7, 0.5)])
def test_biased_fused_routing_matches_plain_values_and_gradients(isolated, temperature, norm_min):
    router = Router(12, 6, num_text_experts=3 if isolated else None, score_bias=True, norm_min=norm_min)
    with torch.no_grad():
        router.weight.normal_(std=0.5)
        router.score_bias.copy_(torch.randn(6) * 0.3)
    x = torch.randn(40, 12, requires_grad=True)
    ids = torch.tensor([TEXT, IMAGE, VIDEO, TEXT] * 10)
    up = [torch.randn(40, 6), torch.randn(40, 2), torch.randn(6)]

    def run(fused: bool):
        logits = router.logits(x)
        d = (router.route_fused if fused else router.route)(logits, 2, ids if isolated else None, temperature)
        loss = (d.probs * up[0]).sum() + (d.weights * up[1]).sum() + (d.probs.sum(0) * up[2]).sum()
        return d, torch.autograd.grad(loss, [x, router.weight])

    (fd, fg), (pd, pg) = run(True), run(False)
    assert torch.equal(fd.experts, pd.experts)
    torch.testing.assert_close(fd.weights, pd.weights, atol=1e-6, rtol=1e-6)
    for a, b in zip(fg, pg):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # selection by probs + bias, weights from the probs alone (the bias is not in them)
    expected = (fd.probs + router.score_bias)
    if isolated:
        expected = expected.masked_fill(~router.allowed(ids), float("-inf"))
    assert torch.equal(fd.experts, expected.topk(2).indices)
    chosen = fd.probs.gather(1, fd.experts)
    torch.testing.assert_close(fd.weights, chosen / chosen.sum(-1, keepdim=True).clamp(min=norm_min))
    if norm_min == 0.5:  # the clamp is active for some tokens: weights no longer sum to 1
        assert (fd.weights.sum(-1) < 0.999).any()


def test_bias_update_follows_measured_load_and_balances_a_skewed_router():
    layer = MoEFeedForward(8, hidden=8, num_experts=4, top_k=1, bias_gamma=0.01, load_balance_coef=0.0)
    assert layer.router.score_bias is not None
    torch.manual_seed(0)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[0] += 1.0  # expert 0 wins most tokens of positive mean
    x = torch.randn(256, 8) + 0.5
    layer.eval()
    layer(x)
    assert int(layer.router.load_count.sum()) == 0  # eval forwards are not counted
    layer.train()
    first = layer(x).stats.tokens_per_expert
    assert torch.equal(layer.router.load_count, first) and load_cv(first) > 1.0
    assert update_score_biases(layer) == 1
    torch.testing.assert_close(layer.router.score_bias, 0.01 * torch.sign(64.0 - first.float()))
    assert float(layer.router.score_bias[0]) < 0  # the overloaded expert is pushed down
    assert int(layer.router.load_count.sum()) == 0
    for _ in range(100):
        layer(x)
        update_score_biases(layer)
    assert load_cv(layer(x).stats.tokens_per_expert) < 0.3 * load_cv(first)


def test_bias_step_uses_the_mean_of_each_isolated_group():
    bias = bias_step(torch.zeros(4), torch.tensor([10.0, 2.0, 1.0, 1.0]), 0.1, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_score_bias_is_saved_with_the_layer_and_groups_round_trip():
    layer = MoEFeedForward.from_ernie45_vl(_ernie_vl_block(shared=1))
    state = layer.state_dict()
    assert "groups.0.router.score_bias" in state and "groups.1.router.score_bias" in state
    assert not any("load_count" in k for k in state)
    again = MoEFeedForward.from_config(16, layer.config)
    again.load_state_dict(state)
    x, ids = torch.randn(12, 16), torch.tensor([TEXT, IMAGE, VIDEO] * 4)
    with torch.no_grad():
        torch.testing.assert_close(again(x, ids).output, layer(x, ids).output)


def test_groups_layer_upcycles_from_a_dense_mlp_exactly():
    from ernie_vl.moe import DenseSwiGLU

    dense = DenseSwiGLU(16, 24)
    layer = MoEFeedForward.upcycle(dense, num_experts=4, top_k=2, routing="groups", num_shared_experts=1,
                                   score_bias=True)
    x, ids = torch.randn(12, 16), torch.tensor([TEXT, IMAGE, VIDEO] * 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, ids).output, dense(x), atol=1e-5, rtol=1e-5)


def test_router_stays_float32_under_bf16_autocast():
    router = Router(32, 6, score_bias=True)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.logits(x)
        decision = router.route_fused(logits, 2)
    assert logits.dtype == torch.float32 and decision.weights.dtype == torch.float32
    torch.testing.assert_close(logits, x @ router.weight.t().detach(), atol=1e-6, rtol=1e-6)
