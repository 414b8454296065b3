"""The fused routing node (one thread, closed-form backward) against the plain autograd router."""
from __future__ import annotations

import pytest
import torch

from ernie_vl.modality import IMAGE, TEXT, VIDEO
from ernie_vl.moe.router import Router
from ernie_vl.moe.kernels.pool import single_threaded


@pytest.mark.parametrize("isolated,temperature,top_k", [(False, 1.0, 2), (True, 1.0, 2), (False, 0.7, 3),
                                                         (True, 1.8, 1)])
def test_route_fused_matches_plain_route_values_and_gradients(isolated, temperature, top_k):
    router = Router(12, 6, num_text_experts=3 if isolated else None)
    with torch.no_grad():
        router.weight.normal_(std=0.5)
    x = torch.randn(40, 12, requires_grad=True)
    ids = torch.tensor([TEXT, IMAGE, VIDEO, TEXT] * 10)
    upstream = [torch.randn(40, 6), torch.randn(40, 6), torch.randn(40, top_k), torch.randn(40), torch.randn(6),
                torch.randn(40, 6)]

    def run(fused: bool):
        logits = router.logits(x)
        route = router.route_fused if fused else router.route
        d = route(logits, top_k, ids if isolated else None, temperature)
        lse = d.lse if fused else torch.logsumexp(d.masked_logits, dim=-1)
        prob_sum = d.prob_sum if fused else d.probs.sum(0)
        finite = torch.where(torch.isfinite(d.masked_logits), d.masked_logits, 0.0)
        outs = [finite, d.probs, d.weights, lse, prob_sum, logits]
        loss = sum((o * u).sum() for o, u in zip(outs, upstream))
        grads = torch.autograd.grad(loss, [x, router.weight])
        return d, outs, grads

    fused, fused_outs, fused_grads = run(True)
    plain, plain_outs, plain_grads = run(False)
    assert torch.equal(fused.experts, plain.experts)
    for a, b in zip(fused_outs, plain_outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if isolated:  # visual tokens never reach text experts and vice versa
        assert bool((fused.experts[ids == TEXT] < 3).all()) and bool((fused.experts[ids != TEXT] >= 3).all())


def test_single_threaded_restores_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with single_threaded():
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
