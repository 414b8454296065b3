"""encoders.attention: fused and eager paths agree; masks and head gates behave."""
from __future__ import annotations

import pytest
import torch

from encoders.attention import MultiHeadAttention


def _pair(dim: int = 32, heads: int = 4) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    fused = MultiHeadAttention(dim, heads, attn_impl="fused")
    eager = MultiHeadAttention(dim, heads, attn_impl="eager")
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def test_fused_matches_eager_without_mask() -> None:
    fused, eager = _pair()
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fused_matches_eager_with_causal_mask(kind: str) -> None:
    fused, eager = _pair()
    x = torch.randn(2, 9, 32)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = causal if kind == "bool" else torch.zeros(9, 9).masked_fill(~causal, float("-inf"))
    out = fused(x, attn_mask=mask)
    torch.testing.assert_close(out, eager(x, attn_mask=mask), atol=1e-5, rtol=1e-5)
    # causality: changing the last token leaves the earlier outputs untouched
    y = x.clone()
    y[:, -1] += 1.0
    torch.testing.assert_close(fused(y, attn_mask=mask)[:, :-1], out[:, :-1])


def test_matches_torch_multihead_attention() -> None:
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ours = MultiHeadAttention(32, 4)
    ours.qkv.weight.data.copy_(ref.in_proj_weight)
    ours.qkv.bias.data.copy_(ref.in_proj_bias)
    ours.proj.weight.data.copy_(ref.out_proj.weight)
    ours.proj.bias.data.copy_(ref.out_proj.bias)
    x = torch.randn(2, 7, 32)
    expected, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_head_gate_zero_removes_a_head() -> None:
    attn = MultiHeadAttention(32, 4)
    x = torch.randn(2, 5, 32)
    gate = torch.ones(2, 4)
    gate[0, 1] = 0.0
    q, k, v = attn.split_heads(x)
    heads = attn.attend(q, k, v)
    heads_without = heads.clone()
    heads_without[0, 1] = 0.0
    expected = attn.merge_heads(heads_without)
    torch.testing.assert_close(attn(x, head_gate=gate), expected)
    # the second sample keeps all heads
    torch.testing.assert_close(attn(x, head_gate=gate)[1], attn(x)[1])


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="'flash'.*fused, eager"):
        MultiHeadAttention(32, 4, attn_impl="flash")
    with pytest.raises(ValueError, match="30.*7"):
        MultiHeadAttention(30, 7)
