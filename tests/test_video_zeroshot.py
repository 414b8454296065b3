"""Zero-shot prompt ensembles: per-class prompt lists, averaged normalised embeddings, mixed with templates."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from video import ZeroShotClassifier
from video.cli_support import build_classifier

# prompt -> raw text embedding (different norms: the per-prompt normalisation matters)
TABLE = {"a": [3.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [1.0, 2.0, 0.0], "d": [0.0, 0.0, 2.0], "e": [0.0, 3.0, 4.0]}


class TableTokenizer:
    def __init__(self) -> None:
        self.keys = list(TABLE)
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen += list(texts)
        return torch.tensor([[self.keys.index(t)] for t in texts])


class TableModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(list(TABLE.values())), requires_grad=False)

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]

    def encode_video(self, clips):
        return clips.mean(dim=(1, 3, 4))  # (B,3)


def test_class_prompt_lists_are_averaged_after_normalising():
    tokenizer = TableTokenizer()
    zs = ZeroShotClassifier(TableModel(), tokenizer, ["x", "y", "c"], templates=("{label}",),
                            class_prompts={"x": ["a", "b"], "y": ["d", "e", "b"]}, logit_scale=10.0)
    assert tokenizer.seen == ["a", "b", "d", "e", "b", "c"]  # "c" from the template
    s = 1 / math.sqrt(2)
    # y: normalised d, e, b = (0,0,1), (0,.6,.8), (0,1,0) -> mean (0, 1.6/3, 1.8/3) -> normalised
    ny = math.hypot(1.6, 1.8)
    expect = torch.tensor([[s, s, 0.0], [0.0, 1.6 / ny, 1.8 / ny], [1 / math.sqrt(5), 2 / math.sqrt(5), 0.0]])
    assert torch.allclose(zs.text_embeddings, expect, atol=1e-6)
    clip = torch.zeros(1, 2, 3, 4, 4)
    clip[:, :, 0] = 1.0  # video embedding (1, 0, 0)
    assert torch.allclose(zs.classify_video(clip)[0], 10.0 * torch.tensor([s, 0.0, 1 / math.sqrt(5)]), atol=1e-5)
    assert zs.prompts_for("y") == ("d", "e", "b") and zs.prompts_for("c") == ("c",)


def test_every_class_with_prompts_needs_no_valid_template():
    zs = ZeroShotClassifier(TableModel(), TableTokenizer(), ["x", "y"], templates=(),
                            class_prompts={"x": "a", "y": ["b"]}, logit_scale=1.0)
    assert torch.allclose(zs.text_embeddings, torch.eye(3)[:2], atol=1e-6)


def test_bad_class_prompts_are_named():
    model, tok = TableModel(), TableTokenizer()
    with pytest.raises(ValueError, match=r"\['z'\].*not among the classes"):
        ZeroShotClassifier(model, tok, ["x"], class_prompts={"x": ["a"], "z": ["b"]})
    with pytest.raises(ValueError, match=r"class_prompts\['x'\] must be a non-empty list"):
        ZeroShotClassifier(model, tok, ["x"], class_prompts={"x": []})
    with pytest.raises(TypeError, match="dict class name"):
        ZeroShotClassifier(model, tok, ["x"], class_prompts=[("x", ["a"])])
    with pytest.raises(ValueError, match="{label}"):  # a class without prompts falls back to the templates
        ZeroShotClassifier(model, tok, ["x", "c"], templates=("no label",), class_prompts={"x": ["a"]})


def test_cli_builder_maps_folder_names_to_prompt_names():
    loaded = SimpleNamespace(model=TableModel(), tokenizer=TableTokenizer(), model_id="table")
    zs = build_classifier(loaded, ["c", "x_y"], True, ["{label}"], class_prompts={"x_y": ["b", "e"]})
    assert zs.class_names == ["c", "x y"]
    n = math.hypot(1.6, 0.8)
    assert torch.allclose(zs.text_embeddings[1], torch.tensor([0.0, 1.6 / n, 0.8 / n]), atol=1e-6)
    with pytest.raises(ValueError, match="not among the classes"):
        build_classifier(loaded, ["c"], True, None, class_prompts={"q": ["a"]})
