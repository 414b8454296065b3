"""bench/moe.py's anchors: the Mixtral block at its best is the same function as the eager block."""
from __future__ import annotations

import sys

import pytest
import torch

from tests._bench_helpers import load_bench


@pytest.fixture()
def moe_bench():
    pytest.importorskip("transformers")
    saved = list(sys.path)
    try:
        return load_bench("moe")
    finally:
        sys.path[:] = saved  # the script puts bench/ first: bench/encoders.py must not shadow ``encoders``


def test_every_mixtral_anchor_computes_the_eager_blocks_output(moe_bench):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    cands, _ = moe_bench.build(16, 32, 4, 2, x)
    mixtrals = {k: m for k, (m, _) in cands.items() if k.startswith("mixtral")}
    assert set(mixtrals) <= set(moe_bench.MIXTRAL_IMPL) and "mixtral" in mixtrals
    if "mixtral_grouped_mm" not in mixtrals:
        pytest.skip("this transformers / torch has no grouped_mm experts")
    eager, grouped = mixtrals["mixtral"], mixtrals["mixtral_grouped_mm"]
    assert grouped.experts.config._experts_implementation == "grouped_mm"
    assert eager.experts.config._experts_implementation == "eager"
    xg = x.unsqueeze(0).clone().requires_grad_(True)
    xe = x.unsqueeze(0).clone().requires_grad_(True)
    out_g, out_e = grouped(xg), eager(xe)
    torch.testing.assert_close(out_g, out_e, rtol=1e-5, atol=1e-6)
    out_g.square().sum().backward()
    out_e.square().sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grouped.experts.gate_up_proj.grad, eager.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-6)
