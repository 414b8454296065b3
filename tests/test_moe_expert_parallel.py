"""Expert parallelism on gloo: 2 and 4 ranks, each holding num_experts / E experts, equal the whole
layer on the whole batch (output, aux losses, routing statistics, every gradient, checkpoints)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.expert_parallel import check_expert_parallel

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

TOL = 1e-5


def _run(world, case, tmp_path):
    from _ep_helpers import run_ranks

    results = run_ranks(world, case, tmp_path)
    for rank, res in enumerate(results):
        errs = res["errors"]
        assert len(errs) >= 17  # output, x grad, 4 losses, 6 statistics, every gradient, 3 checkpoint checks
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        assert not bad, (case, world, rank, bad)
        assert any(k.startswith("grad.") and "experts" in k for k in errs) and any("router" in k for k in errs)
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_shared_routing_matches_one_process(world, tmp_path):
    _run(world, "shared", tmp_path)


def test_rank_without_rows_for_its_experts(tmp_path):
    # every token picks experts 0 and 1: rank 1 (experts 2, 3) receives no rows at all
    res = _run(2, "uneven", tmp_path)
    counts = res[0]["info"]["tokens_per_expert"]
    assert counts[2] == counts[3] == 0 and counts[0] > 0 and counts[1] > 0


def test_isolated_routing_swiglu_four_ranks(tmp_path):
    _run(4, "isolated", tmp_path)


@pytest.mark.parametrize("world", [2, 4])
def test_modality_groups_split_per_group(world, tmp_path):
    # ERNIE 4.5 VL groups (4 text, 8 vision experts): each group split across the ranks; at 2 ranks
    # rank 0 holds only text tokens and rank 1 only visual ones, so each rank has an empty group
    _run(world, "groups", tmp_path)


def test_bad_sizes_fail_naming_the_numbers():
    with pytest.raises(ValueError, match="world size 6 is not divisible by --expert-parallel 4"):
        check_expert_parallel(4, 6)
    layer = MoEFeedForward(8, hidden=8, num_experts=6, top_k=2)
    with pytest.raises(ValueError, match=r"--expert-parallel 4 does not divide the 6 experts.*1, 2, 3, 6"):
        check_expert_parallel(4, 4, torch.nn.Sequential(layer))
    groups = MoEFeedForward(8, hidden=8, top_k=2, routing="groups", group_experts=(4, 6))
    with pytest.raises(ValueError, match=r"does not divide the 6 experts of group 1 \(vision\)"):
        check_expert_parallel(4, 4, groups)
    check_expert_parallel(2, 4, groups)  # divides both groups: accepted
    capacity = MoEFeedForward(8, hidden=8, num_experts=4, top_k=2, dispatch="capacity")
    with pytest.raises(ValueError, match="dropless"):
        check_expert_parallel(2, 2, capacity)
    with pytest.raises(ValueError, match="integer >= 1"):
        check_expert_parallel(0, 2)
