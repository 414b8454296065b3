"""Scratch buffers of the fused experts: reused across calls, never aliased with saved tensors."""
from __future__ import annotations

import threading

import pytest
import torch

from ernie_vl.moe.kernels.workspace import release_workspace, scratch, workspace_bytes

from _moe_helpers import reference_output, small_layer as _layer


def test_scratch_reuses_one_buffer_per_slot_and_grows_when_needed():
    release_workspace()
    like = torch.zeros(1)
    a = scratch("slot", (4, 8), like)
    b = scratch("slot", (2, 8), like)
    assert a.data_ptr() == b.data_ptr() and workspace_bytes() == 32 * 4
    other = scratch("other", (3,), like)
    assert other.data_ptr() != a.data_ptr() and workspace_bytes() == (32 + 3) * 4
    c = scratch("slot", (10, 8), like)  # larger: a new buffer replaces the old one
    assert c.shape == (10, 8) and workspace_bytes() == (80 + 3) * 4
    release_workspace()
    assert workspace_bytes() == 0


def test_repeated_inference_calls_do_not_grow_the_workspace():
    layer = _layer()
    x = torch.randn(30, 16)
    with torch.no_grad():
        first = layer(x).output
        held = workspace_bytes()
        second = layer(x).output
    assert held > 0 and workspace_bytes() == held
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference_output(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expert_type,activation", [("mlp", "gelu"), ("swiglu", "silu")])
def test_forward_between_forward_and_backward_does_not_corrupt_gradients(expert_type, activation):
    layer = _layer(expert_type=expert_type, activation=activation)
    x1 = torch.randn(30, 16, requires_grad=True)
    x2 = torch.randn(20, 16, requires_grad=True)  # fewer rows: the same scratch buffers are reused
    out1 = layer(x1).output
    layer(x2).output.sum().backward()  # reuses every scratch slot before out1's backward
    params = [x1] + list(layer.experts.parameters()) + [layer.router.weight]
    ours = torch.autograd.grad((out1 * out1).sum(), params, retain_graph=True)
    ref = reference_output(layer, x1)
    theirs = torch.autograd.grad((ref * ref).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    again = torch.autograd.grad((out1 * out1).sum(), params)  # retained graph: same gradients
    for a, b in zip(ours, again):
        assert torch.equal(a, b)


def test_training_after_an_inference_mode_call():
    layer = _layer()
    x = torch.randn(25, 16)
    release_workspace()
    with torch.inference_mode():
        fast = layer(x).output  # scratch buffers created inside inference_mode
    xg = x.clone().requires_grad_(True)
    out = layer(xg).output
    torch.testing.assert_close(out.detach(), fast, atol=1e-6, rtol=1e-6)
    gx, = torch.autograd.grad(out.sum(), [xg])
    rx, = torch.autograd.grad(reference_output(layer, xg).sum(), [xg])
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)


def test_threads_have_separate_scratch_buffers():
    layer = _layer()
    xs = [torch.randn(40 + 7 * i, 16) for i in range(4)]
    with torch.no_grad():
        serial = [layer(x).output for x in xs]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[i] = layer(xs[i]).output

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        torch.testing.assert_close(results[i], expected, atol=1e-6, rtol=1e-6)
