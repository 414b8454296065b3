"""Real data: `tiny` trained on scikit-learn's handwritten digits captioned "a photo of the digit 3" reaches
zero-shot top-1 >= 0.8 on a held-out split (fixed seed, fixed step count)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

# 400 steps reached 0.77-0.88 depending on the draw of the initial weights (the video encoder's config changes
# the draws of every module built after it); with the current preset seed 0 reaches 0.77 / 0.82 / 0.92 at
# 400 / 600 / 800 steps, seed 1 0.83 / 0.91 at 400 / 600
STEPS = 800


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_trained_on_digit_captions_classifies_held_out_digits_zero_shot(tmp_path):
    from ernie_vl.data.digits import CAPTION, make_digits
    from ernie_vl.model import ErnieVL
    from ernie_vl.train import TrainConfig, train
    from retrieval.classify import LabelledImages, classification_metrics, embed_labelled, zero_shot_logits

    data = make_digits(tmp_path / "digits", seed=0)
    result = train(TrainConfig(out=str(tmp_path / "run"), model="tiny", pairs=[str(data.csv["train"])],
                               batch_pairs=64, max_steps=STEPS, warmup_steps=20, num_workers=0, progress=False,
                               threads=1, seed=0, decode_cache=None))
    model = ErnieVL.from_pretrained(result.final_dir).eval()
    classes = [str(d) for d in range(10)]
    test = LabelledImages.load(data.labels_csv["test"], classes)
    assert len(test) == 450 and not set(test.paths) & set(LabelledImages.load(data.labels_csv["train"]).paths)
    with torch.no_grad():
        embedded = embed_labelled(model, test, model.preprocess, progress=False)
        logits = zero_shot_logits(model, model.tokenizer, embedded.embeddings, classes,
                                  [CAPTION.replace("{}", "{label}")])
    top1 = classification_metrics(logits, embedded.labels, classes)["top1"]
    print(f"digits zero-shot top-1 after {STEPS} steps: {top1:.3f}")
    assert top1 >= 0.8, top1
