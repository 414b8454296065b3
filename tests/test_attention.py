"""encoders.attention and encoders.windows: fused and eager paths agree; masks, head gates, selected heads
and window attention behave."""
from __future__ import annotations

import pytest
import torch

from encoders.attention import MultiHeadAttention
from encoders.windows import window_attention, window_attention_mask


def _pair(dim: int = 32, heads: int = 4, **kw) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    fused = MultiHeadAttention(dim, heads, attn_impl="fused", **kw)
    eager = MultiHeadAttention(dim, heads, attn_impl="eager", **kw)
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


def test_fused_and_eager_agree_with_masks_and_gates():
    fused, eager = _pair(qkv_bias=False)
    x = torch.randn(2, 9, 32)
    bool_mask = torch.rand(2, 1, 9, 9) > 0.3
    bool_mask[..., 0] = True  # every query sees at least one key
    float_mask = torch.randn(1, 4, 9, 9)
    gate = torch.rand(2, 4)
    for mask in (bool_mask, float_mask):
        torch.testing.assert_close(fused(x, mask, gate), eager(x, mask, gate), atol=1e-5, rtol=0)


def test_bool_mask_blocks_keys():
    attn = MultiHeadAttention(16, 2)
    x = torch.randn(1, 5, 16)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 4] = False  # nobody may look at token 4
    y1 = attn(x, mask)
    x2 = x.clone()
    x2[:, 4] += 10.0
    y2 = attn(x2, mask)
    torch.testing.assert_close(y1[:, :4], y2[:, :4], atol=1e-6, rtol=0)


def test_head_gate_zero_removes_head_contribution():
    attn = MultiHeadAttention(16, 2, proj_bias=False)
    x = torch.randn(2, 5, 16)
    gate = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = attn(x, head_gate=gate)
    assert torch.count_nonzero(y[1]) == 0
    q, k, v = attn.split_heads(x)
    out = attn.attend(q, k, v)
    out[:, 1] = 0
    expected = attn.proj(out.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(y[0], expected[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_forward_selected_equals_masked_gate(impl):
    attn = MultiHeadAttention(32, 4, attn_impl=impl)
    x = torch.randn(3, 7, 32)
    keep = torch.tensor([[True, False, True, False], [False, False, False, False], [True, True, True, True]])
    gate = torch.rand(3, 4) + 0.5
    expected = attn(x, head_gate=gate * keep)
    torch.testing.assert_close(attn.forward_selected(x, keep, gate), expected, atol=1e-5, rtol=0)


def test_forward_selected_skips_heads_nobody_keeps():
    attn = MultiHeadAttention(32, 4, qkv_bias=False)
    x = torch.randn(2, 5, 32)
    keep = torch.tensor([[False, True, False, True], [False, True, False, False]])
    expected = attn(x, head_gate=keep.float())
    torch.testing.assert_close(attn.forward_selected(x, keep), expected, atol=1e-5, rtol=0)
    none = torch.zeros(2, 4, dtype=torch.bool)
    torch.testing.assert_close(attn.forward_selected(x, none), attn.proj.bias.expand(2, 5, 32), atol=0, rtol=0)


def test_forward_selected_rejects_bad_keep():
    attn = MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match="head_keep"):
        attn.forward_selected(torch.randn(2, 5, 32), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("grid,ws", [((4, 4), 2), ((5, 7), 3), ((3, 3), 4)])
def test_window_attention_equals_dense_mask(grid, ws):
    """Partitioned windows (padded when the grid does not tile) == a dense window mask."""
    attn = MultiHeadAttention(16, 2)
    n = 1 + grid[0] * grid[1]
    q, k, v = attn.split_heads(torch.randn(2, n, 16))
    windowed = window_attention(q, k, v, grid, ws, attn.attend)
    dense = attn.attend(q, k, v, window_attention_mask(grid, ws))
    torch.testing.assert_close(windowed, dense, atol=1e-5, rtol=0)
    assert window_attention_mask(grid, ws)[0].all()  # the class token attends globally


def test_window_mask_is_local():
    mask = window_attention_mask((4, 4), 2)
    # patch (0,0) -> token 1 sees (0,1) -> token 2, not (0,2) -> token 3
    assert bool(mask[1, 2]) and not bool(mask[1, 3]) and bool(mask[1, 0])
