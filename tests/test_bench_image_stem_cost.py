"""bench/image_stem_cost.py: every loop and setting trains, and its contiguous-layout stem computes the same."""
from __future__ import annotations

import torch

from _bench_helpers import load_bench


def test_contiguous_wrapper_computes_what_the_channels_last_stem_does():
    bench = load_bench("image_stem_cost")
    from encoders.video_stem import conv_tokenizer, spatial_strides

    torch.manual_seed(0)
    stem = conv_tokenizer(3, (4, 8), spatial_strides(2, (4, 4))).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = stem(x.contiguous(memory_format=torch.channels_last))
        got = bench.Contiguous(stem)(x.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous() and not want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_every_loop_and_setting_takes_an_optimiser_step():
    bench = load_bench("image_stem_cost")
    for kind, setting in [("bare", name) for name in bench.SETTINGS] + [("pairs", "stem"), ("tokenizer", "stem")]:
        torch.manual_seed(0)
        step, module = bench.build(kind, setting, batch=4)
        before = {k: v.detach().clone() for k, v in module.state_dict().items()}
        step()
        changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
        assert any("patch_embed" in k for k in changed), (kind, setting)
        assert any(f".{k}".count(".stem.") for k in changed) == (setting != "linear"), (kind, setting)
