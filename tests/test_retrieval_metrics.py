"""recall_at_k against a brute-force reference, and on a hand-made case."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import retrieval
from retrieval.metrics import recall_at_k


def _brute_force(img, txt, t2i, ks):
    sims = txt @ img.T  # (T, N)
    out = {}
    for k in ks:
        hits = [t2i[j] in np.argsort(-sims[j])[:k].tolist() for j in range(len(t2i))]
        out[f"text_to_image_R@{k}"] = float(np.mean(hits))
    for k in ks:
        hits = []
        for i in range(img.shape[0]):
            if i not in t2i:
                continue
            top = np.argsort(-sims[:, i])[:k]
            hits.append(any(t2i[j] == i for j in top))
        out[f"image_to_text_R@{k}"] = float(np.mean(hits))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_uneven_caption_counts(seed):
    rng = np.random.default_rng(seed)
    num_images, dim = 40, 8
    counts = rng.integers(1, 6, size=num_images)  # 1..5 captions per image
    counts[3] = 0                                  # one image with no caption
    t2i = np.repeat(np.arange(num_images), counts)
    rng.shuffle(t2i)
    img = rng.standard_normal((num_images, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img[t2i] + 0.9 * rng.standard_normal((len(t2i), dim)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ks = (1, 5, 10)
    got = recall_at_k(torch.from_numpy(img), torch.from_numpy(txt), t2i.tolist(), ks=ks, chunk_size=7)
    want = _brute_force(img, txt, t2i.tolist(), ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0.0 < got["text_to_image_R@1"] < 1.0  # the noise makes it a real test
    assert got["text_to_image_R@10"] >= got["text_to_image_R@5"] >= got["text_to_image_R@1"]


def test_recall_hand_made_case():
    # Two images on the axes; captions 0,1 describe image 0, caption 2 describes image 1.
    img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    txt = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9]], np.float32)  # caption 1 points the wrong way
    got = retrieval.recall_at_k(img, txt, [0, 0, 1], ks=(1, 2))
    assert got["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert got["text_to_image_R@2"] == 1.0
    # image 0: best caption is 0 (0.9) -> rank 0; image 1: caption 2 (0.9) beats caption 1 (0.8) -> rank 0
    assert got["image_to_text_R@1"] == 1.0


def test_recall_rejects_bad_input():
    img = torch.randn(3, 4)
    txt = torch.randn(5, 4)
    with pytest.raises(ValueError, match="entries"):
        recall_at_k(img, txt, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        recall_at_k(img, txt, [0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match="width"):
        recall_at_k(img, torch.randn(5, 3), [0, 1, 2, 0, 0])
    with pytest.raises(TypeError):
        recall_at_k([[1.0]], txt, [0] * 5)
