"""encoders.prompts: prompts as strings or as tokens give the same class embeddings, the CLIP recipe by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from encoders.prompts import ensemble_text_embeddings, ensemble_token_embeddings

VOCAB = 50


class BagOfWords(nn.Module):
    """encode_text = sum of word vectors (unnormalised, so the helper's own normalisation is exercised)."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(VOCAB, 6)
        self.calls = []

    def encode_text(self, tokens):
        self.calls.append(tokens.shape[0])
        return self.words(tokens).sum(1)


def tokenize(texts):
    out = torch.zeros(len(texts), 8, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [sum(map(ord, w)) % (VOCAB - 1) + 1 for w in t.split()][:8]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


PROMPTS = [("a cat", "a photo of a cat", "cat"), ("a dog",), ("two birds", "a bird flying")]


def by_hand(model):
    rows = [F.normalize(F.normalize(model.encode_text(tokenize(list(p))).float(), dim=-1).mean(0), dim=-1)
            for p in PROMPTS]
    return torch.stack(rows)


def test_tokens_and_strings_give_the_normalised_mean_of_normalised_prompts():
    model = BagOfWords()
    tokens = ensemble_token_embeddings(model.encode_text, [tokenize(list(p)) for p in PROMPTS], batch_size=2)
    assert model.calls == [2, 2, 2]  # six prompts, batched as asked
    strings = ensemble_text_embeddings(model.encode_text, tokenize, PROMPTS, batch_size=4)
    expected = by_hand(model)
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(strings, expected, atol=1e-6, rtol=1e-6)


class CachedClips:
    """The parts of ``ernie_vl.data.sources.CachedVideos`` that ``evaluate_videos`` reads."""

    def __init__(self, clips, labels, prompt_tokens):
        self.clips, self.labels, self.prompt_tokens = clips, labels, prompt_tokens
        self.norm = type("Identity", (), {"to_float": staticmethod(lambda c: c)})()

    def __len__(self):
        return len(self.labels)


def test_training_evaluation_uses_the_same_class_embeddings():
    from ernie_vl.train.evaluation import evaluate_videos

    model = BagOfWords()
    text = by_hand(model)
    clips = text[[0, 1, 2, 2]][:, None, :]  # each clip's video embedding is a class embedding
    model.encode_video = lambda c: c[:, 0]
    model.classify_video = lambda c: c[:, 0] @ text.t()
    videos = CachedClips(clips, torch.tensor([0, 1, 2, 1]), [tokenize(list(p)) for p in PROMPTS])
    out = evaluate_videos(model, videos)
    assert out["video_zeroshot_top1"] == pytest.approx(0.75)  # the last clip is labelled 1 but looks like 2
    assert out["video_top1"] == pytest.approx(0.75)


@pytest.mark.parametrize("tokens,match", [
    ([], "no classes"),
    ([tokenize(["a"]), tokenize([])], r"prompts per class: \[1, 0\]"),
])
def test_bad_input_is_named(tokens, match):
    with pytest.raises(ValueError, match=match):
        ensemble_token_embeddings(BagOfWords().encode_text, tokens)
