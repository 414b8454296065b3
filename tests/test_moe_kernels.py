"""The two expert kernels (slice loop, padded batched) against the naive reference and each other."""
from __future__ import annotations

import pytest
import torch

import ernie_vl.moe.grouped as grouped
from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.padded import padded_layout, padding_fits

from _moe_reference import reference_moe, small_layer as _layer


def _grads(out: torch.Tensor, params: list[torch.Tensor], g: torch.Tensor):
    return torch.autograd.grad((out * g).sum(), params, allow_unused=True)


@pytest.mark.parametrize("kernel", ["loop", "padded", "threads"])
@pytest.mark.parametrize("opts", [
    dict(expert_type="mlp", activation="gelu"),
    dict(expert_type="mlp", activation="gelu_tanh", bias=False),
    dict(expert_type="swiglu", activation="silu"),
    dict(expert_type="mlp", activation="gelu", dispatch="capacity", capacity_factor=0.5),
])
def test_kernel_matches_reference_forward_and_backward(monkeypatch, kernel, opts):
    monkeypatch.setattr(grouped, "KERNEL", kernel)
    layer = _layer(**opts)
    layer.train()
    x = torch.randn(37, 16, requires_grad=True)
    out = layer(x)
    keep = None
    if opts.get("dispatch") == "capacity":
        assert int(out.stats.dropped_tokens) > 0  # the case exercises the dropped-row sentinel
        plan = layer.route_tokens(x, None, None).plan
        keep = (plan.inverse < plan.token_index.shape[0]).view(37, 2)
    ref = reference_moe(layer, x, keep=keep)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    params = [x] + [p for p in layer.parameters()]
    g = torch.randn_like(ref)
    for a, b in zip(_grads(out.output, params, g), _grads(ref, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        fast = layer(x).output
    torch.testing.assert_close(fast, out.output.detach(), atol=1e-6, rtol=1e-6)


def test_padded_kernel_gives_idle_experts_zero_gradient(monkeypatch):
    monkeypatch.setattr(grouped, "KERNEL", "padded")
    layer = _layer()
    with torch.no_grad():
        layer.router.weight[3] = 0.0
        layer.router.weight[3, 0] = -100.0
    x = torch.randn(20, 16)
    x[:, 0] = x[:, 0].abs() + 1.0
    out = layer(x)
    assert int(out.stats.tokens_per_expert[3]) == 0
    out.output.square().sum().backward()
    for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2, layer.experts.b2):
        assert torch.equal(p.grad[3], torch.zeros_like(p.grad[3]))
        assert p.grad[:3].abs().sum() > 0


def test_padded_layout_places_rows_in_expert_blocks():
    counts = [2, 0, 3]
    # token-major assignments (k=1): tokens 0..4 -> experts [2, 0, 2, 2, 0]
    experts = torch.tensor([[2], [0], [2], [2], [0]])
    from ernie_vl.moe.dispatch import plan_dispatch

    plan = plan_dispatch(experts, 3)
    assert plan.counts == counts
    weights = torch.tensor([[0.5], [0.6], [0.7], [0.8], [0.9]])
    layout = padded_layout(plan.counts, plan.order, plan.token_index, plan.inverse, weights)
    assert layout.capacity == 3
    # block 0: tokens 1, 4, pad; block 1: all pad; block 2: tokens 0, 2, 3
    assert layout.pad_token.tolist() == [1, 4, 0, 0, 0, 0, 0, 2, 3]
    assert layout.pad_weight.tolist() == pytest.approx([0.6, 0.9, 0, 0, 0, 0, 0.5, 0.7, 0.8])
    assert layout.pad_inverse.tolist() == [6, 0, 7, 8, 1]


def test_auto_kernel_choice():
    assert padding_fits([10, 11, 9, 10]) and not padding_fits([30, 1, 1, 1]) and not padding_fits([0, 0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert grouped.choose_kernel([10, 11, 9, 10]) == "threads"
        assert grouped.choose_kernel([30, 1, 1, 1]) == "threads"  # no padding: uneven loads are fine
        assert grouped.choose_kernel([40, 0, 0, 0]) == "loop"  # one busy expert: nothing to share out
        torch.set_num_threads(1)
        assert grouped.choose_kernel([10, 11, 9, 10]) == "loop"  # one thread: no barriers to save
    finally:
        torch.set_num_threads(threads)


def test_unknown_kernel_name_raises(monkeypatch):
    monkeypatch.setattr(grouped, "KERNEL", "fast")
    with pytest.raises(ValueError, match="KERNEL"):
        grouped.choose_kernel([1, 2])
