"""ExpertCurriculum: dense-to-sparse top-k annealing applied to every MoE layer of a model."""
from __future__ import annotations

import pytest
import torch

from ernie_vl.backbone import SharedBackbone
from ernie_vl.modality import IMAGE, TEXT
from ernie_vl.moe import ExpertCurriculum, MoEConfig, MoEFeedForward

from _moe_helpers import reference_output


def test_schedule_values():
    layer = MoEFeedForward(8, 12, num_experts=8, top_k=2)
    cur = ExpertCurriculum(hold_steps=10, anneal_steps=60)
    ks = [cur.top_k_at(s, layer) for s in (0, 9, 10, 20, 40, 69, 70, 1000)]
    assert ks == [8, 8, 8, 7, 5, 2, 2, 2]
    assert ExpertCurriculum(start_top_k=4, end_top_k=1, anneal_steps=0).top_k_at(0, layer) == 1
    with pytest.raises(ValueError, match="step"):
        cur.top_k_at(-1, layer)
    with pytest.raises(ValueError, match="anneal_steps"):
        ExpertCurriculum(anneal_steps=-1)


def test_apply_walks_a_whole_model_and_changes_the_forward():
    moe = MoEConfig(hidden=32, num_experts=4, top_k=1)
    bb = SharedBackbone(16, 4, 2, moe_every=2, moe=moe)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), bb)  # nested: found anywhere
    cur = ExpertCurriculum(anneal_steps=3)
    assert cur.apply(model, 0) == {"1.blocks.1.mlp": 4, "1.blocks.3.mlp": 4}
    layer = bb.blocks[1].mlp
    x = torch.randn(10, 16)
    dense_out = layer(x)
    # k = E: every token uses every expert, weighted by the full softmax (a soft mixture)
    assert dense_out.stats.tokens_per_expert.tolist() == [10, 10, 10, 10]
    torch.testing.assert_close(dense_out.output, reference_output(layer, x), atol=1e-5, rtol=1e-5)
    probs = dense_out.router_logits.softmax(-1)
    soft = sum(probs[:, e, None] * layer.experts.expert(x, e) for e in range(4))
    torch.testing.assert_close(dense_out.output, soft, atol=1e-5, rtol=1e-5)
    assert cur.apply(model, 3) == {"1.blocks.1.mlp": 1, "1.blocks.3.mlp": 1}
    assert layer(x).stats.tokens_per_expert.sum() == 10
    assert layer.config.top_k == 1  # the configured target is untouched


def test_isolated_routing_is_clamped_to_the_group_size():
    layer = MoEFeedForward(8, 12, num_experts=6, top_k=1, routing="isolated", num_text_experts=2)
    ExpertCurriculum().apply(layer, 0)
    assert layer.top_k == 2
    ids = torch.tensor([TEXT, IMAGE] * 3)
    out = layer(torch.randn(6, 8), ids)
    assert out.stats.tokens_per_expert[:2].tolist() == [3, 3]  # both text experts for every text token
    assert int(out.stats.tokens_per_expert[2:].sum()) == 6
