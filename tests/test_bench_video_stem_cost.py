"""bench/video_stem_cost.py: its profile section names the stem's ops on channels-last maps, and its wall-time line."""
from __future__ import annotations

import torch

from _bench_helpers import load_bench


def test_profile_rows_show_the_frame_difference_input_reaching_the_first_convolution_channels_last():
    bench = load_bench("video_stem_cost")
    torch.manual_seed(0)
    runs = {("model", name): bench.build("model", bench.SETTINGS[name])[1] for name in ("tokenizer_diff", "linear")}
    clips, labels = torch.rand(2, 8, 3, 32, 32), torch.randint(8, (2,))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines = bench.profile_lines(runs, clips, labels, steps=1)
    finally:
        torch.set_num_threads(previous)
    text = "\n".join(lines)
    assert "`tokenizer_diff`" in text and "`linear`" in text
    # pixels and differences, written channels-last in one pass, are what the first 3x3x3 convolution reads
    assert "| convolution | 2x6x8x32x32 (channels-last) |" in text
    assert "| convolution | 2x16x8x16x16 (channels-last) |" in text  # and the layout holds through the blocks
    assert "| all convolution ops on these tensors |" in text
    assert bench.profile_lines(runs, clips, labels, steps=0) == []


def test_wall_line_gives_each_full_model_step_and_its_ratio():
    bench = load_bench("video_stem_cost")
    wall = {("bare", "linear"): 9.0, ("model", "linear"): 40.0, ("model", "tokenizer_diff"): 60.0}
    (line,) = [x for x in bench.wall_lines(wall, threads=1) if x]
    assert "`linear` 40.0 ms (1.00x), `tokenizer_diff` 60.0 ms (1.50x)." in line and "9.0" not in line
    assert bench.wall_lines(wall, threads=2) == []
