"""bench/scaling.py: the gloo measurement times the exchange, and the paper model's arithmetic."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from _bench_helpers import load_bench


@pytest.fixture(scope="module")
def scaling():
    return load_bench("scaling")


def test_paper_model_terms(scaling):
    one_node, big = scaling.paper_step(8), scaling.paper_step(128)
    a = scaling.ASSUMPTIONS
    # one node: no InfiniBand, only the in-node all-reduce of the dense (attention) gradients
    dense = 32 * 4 * 4096 ** 2 * a["grad_bytes"]
    assert one_node["allreduce_s"] == pytest.approx(2 * 7 / 8 * dense / (a["nvlink_allreduce_busbw_GBps"] * 1e9))
    # the all-to-all: 4 exchanges x 32 layers x tokens x top-2 x d x 2 bytes x 7/8 leaving the GPU, over NVLink
    a2a = 4 * 32 * a["tokens_per_gpu"] * 2 * 4096 * 2 * 7 / 8 / (a["nvlink_alltoall_GBps"] * 1e9)
    assert one_node["a2a_s"] == pytest.approx(a2a) and big["a2a_s"] == pytest.approx(a2a)
    assert big["compute_s"] == one_node["compute_s"]  # weak scaling: the same work per GPU
    assert big["allreduce_s"] > scaling.paper_step(16)["allreduce_s"] > one_node["allreduce_s"]
    assert big["step_s"] == pytest.approx(big["compute_s"] + big["a2a_s"] + 0.2 * big["allreduce_s"])


@pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo is not available")
def test_two_gloo_ranks_report_the_exchange_share(scaling):
    opts = dict(tokens=64, d_model=16, hidden=32, experts=4, steps=2, warmup=1, threads=1)
    one, two = scaling.measure(1, opts), scaling.measure(2, opts)
    assert one["a2a_share"] == 0.0 and one["tokens"] == 64  # no exchange in one process
    assert 0.0 < two["a2a_share"] < 1.0 and two["tokens"] == 128
    assert two["tokens_per_s"] == pytest.approx(two["tokens"] / two["step_s"])
