"""Image classification evaluation: zero-shot (parity with a by-hand open_clip computation), the linear probe
(against scikit-learn's LogisticRegression), labelled-image loading, and `ernie-vl classify` on image files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("red_square", "green_disc", "blue_bar")


def make_folder(root: Path, per_class: int = 3, size: int = 40, seed: int = 0) -> Path:
    """ROOT/<class>/<i>.png: noisy images whose colour and shape depend on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = [(abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4),
             (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2,
             abs(xx - size / 2) < size / 10]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            img[masks[c], c] = 200 + rng.integers(0, 55)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_zero_shot_of_random_open_clip_equals_a_by_hand_open_clip_computation(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from ernie_vl.app.cli import main

    data = make_folder(tmp_path / "data")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    templates = ["a photo of a {c}.", "a drawing of the {c}."]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "out"
    assert main(["eval-zeroshot", "open_clip:ViT-B-32", str(data), "--labels", str(tmp_path / "classes.txt"),
                 "--templates", str(tmp_path / "templates.txt"), "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    # by hand, with open_clip only: its random init under the seed the hub documents (0), its transform,
    # its prompt-ensemble builder, cosine logits
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names = [c.replace("_", " ") for c in CLASSES]
    with torch.no_grad():
        weights = build_zero_shot_classifier(model, tokenizer, names, [lambda c, t=t: t.replace("{c}", c)
                                                                       for t in templates])
        files = sorted(data.glob("*/*.png"))
        images = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
        logits = 100.0 * model.encode_image(images, normalize=True) @ weights
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    top1 = float((logits.argmax(1) == labels).double().mean())
    assert [p["path"] for p in predictions] == [str(f) for f in files]
    assert [p["top"][0] for p in predictions] == [CLASSES[i] for i in logits.argmax(1).tolist()]
    assert metrics["top1"] == top1
    # a random ViT predicts one class for most images, so compare the logits themselves too
    from ernie_vl.app.cli.eval_zeroshot import evaluate_zero_shot

    _, (embedded, ours, _) = evaluate_zero_shot("open_clip:ViT-B-32", data, tmp_path / "classes.txt",
                                                tmp_path / "templates.txt", workers=0, progress=False)
    assert embedded.paths == [str(f) for f in files]
    assert torch.allclose(ours, logits, atol=1e-4, rtol=0), (ours - logits).abs().max()
    assert metrics["top5"] == 1.0 and metrics["num_images"] == 9 and metrics["num_failed"] == 0
    confusion = json.loads((out / "confusion.json").read_text())["counts"]
    assert sum(map(sum, confusion)) == 9 and (out / "confusion.png").stat().st_size > 0


def test_shared_prompt_ensemble_matches_the_mean_of_normalised_prompt_embeddings():
    from encoders.prompts import class_prompt_lists, ensemble_text_embeddings
    from video.zeroshot import ZeroShotClassifier

    table = torch.randn(8, 5)
    tokenizer = lambda texts: torch.tensor([[len(t) % 8] for t in texts])  # noqa: E731
    encode = lambda tokens: table[tokens[:, 0]] * 3.0  # noqa: E731
    per_class = class_prompt_lists(["ab", "c"], ["{label}", "x {}"], {"c": ["abc", "abcd", "a"]})
    assert per_class == [("ab", "x ab"), ("abc", "abcd", "a")]
    got = ensemble_text_embeddings(encode, tokenizer, per_class, batch_size=2)
    unit = torch.nn.functional.normalize(table, dim=-1)
    want = torch.nn.functional.normalize(torch.stack([unit[[2, 4]].mean(0), unit[[3, 4, 1]].mean(0)]), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)

    class Model(torch.nn.Module):  # video zero-shot goes through the same helper
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode_text(self, tokens):
            return encode(tokens)

        def encode_video(self, clips):
            return clips.flatten(1)[:, :5]

    zs = ZeroShotClassifier(Model(), tokenizer, ["ab", "c"], templates=["{label}", "x {label}"],
                            class_prompts={"c": ["abc", "abcd", "a"]})
    assert torch.allclose(zs.text_embeddings, want, atol=1e-6)


def test_linear_probe_matches_scikit_learn_on_digits_and_round_trips(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from retrieval.probe import WEIGHT_DECAYS, LinearProbe, fit_linear_probe

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    with torch.inference_mode():  # features embedded under inference mode are accepted
        features = torch.tensor(xtr)
    probe = fit_linear_probe(features, torch.tensor(ytr), [str(i) for i in range(10)])
    ours = float((probe.logits(torch.tensor(xte)).argmax(1).numpy() == yte).mean())
    ref = LogisticRegression(max_iter=5000).fit(xtr, ytr).score(xte, yte)
    assert ours >= ref - 0.02 and ours > 0.93, (ours, ref)
    assert probe.weight_decay in WEIGHT_DECAYS and 0.9 < probe.val_top1 <= 1.0
    back = LinearProbe.load(probe.save(tmp_path / "probe"))
    assert torch.equal(back.logits(torch.tensor(xte)), probe.logits(torch.tensor(xte)))
    with pytest.raises(ValueError, match="do not fit a probe over 64"):
        probe.logits(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not a saved linear probe"):
        LinearProbe.load(tmp_path)


def test_token_and_layer_features_are_the_encoder_patch_mean_and_every_layer_mean():
    import ernie_vl
    from ernie_vl.app.image_features import ImageFeatures

    model = ernie_vl.create_model("test").eval()
    images = torch.randn(3, 3, 32, 32)
    enc_width, width = model.cfg.image_encoder.width, model.cfg.backbone.width
    with torch.no_grad():
        tokens = ImageFeatures(model, "tokens").encode_image(images)
        layers = ImageFeatures(model, "layers").encode_image(images)
        want_tokens = model.image_encoder(images).patch_tokens.mean(1)
        last = model.image_features(images, routing=False).backbone.hidden.mean(1)
    torch.testing.assert_close(tokens, want_tokens)
    assert layers.shape == (3, enc_width + (1 + len(model.backbone.blocks)) * width)
    torch.testing.assert_close(layers[:, :enc_width], want_tokens)
    torch.testing.assert_close(layers[:, -width:], last)
    assert not ImageFeatures(model, "layers").normalized
    assert not model.image_encoder._forward_hooks and not model.backbone.blocks[0]._forward_hooks  # hooks removed


def test_small_probes_solve_on_one_thread_and_restore_the_thread_count(monkeypatch):
    import retrieval.probe as probe_module

    seen = []
    real_fit = probe_module._fit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(probe_module, "_fit", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(60, 8)
        y = torch.arange(60) % 3
        probe_module.fit_linear_probe(x + 3 * torch.nn.functional.one_hot(y, 8), y, ["a", "b", "c"],
                                     weight_decays=(1e-3, 1.0))
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        monkeypatch.setattr(probe_module, "SINGLE_THREAD_BELOW", 10)  # a "large" problem keeps the threads
        seen.clear()
        probe_module.fit_linear_probe(x, y, ["a", "b", "c"], weight_decays=(1.0,))
        assert seen == [2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_labelled_images_from_a_csv_and_unknown_labels(tmp_path):
    from retrieval.classify import LabelledImages

    make_folder(tmp_path / "data", per_class=1)
    csv = tmp_path / "data" / "labels.csv"
    csv.write_text("path,label\nred_square/0.png,red_square\nblue_bar/0.png,blue_bar\n")
    images = LabelledImages.load(csv, CLASSES)
    assert images.labels == [0, 2] and images.paths[0] == str(tmp_path / "data" / "red_square" / "0.png")
    with pytest.raises(ValueError, match=r"\['green_disc'\] .* not among the 2 classes"):
        LabelledImages.load(tmp_path / "data", ["red_square", "blue_bar"])
    with pytest.raises(ValueError, match="folder ROOT/<class>/<file> or a CSV"):
        LabelledImages.load(tmp_path / "missing")


def test_classify_images_zero_shot_and_with_a_saved_probe(tmp_path, capsys):
    import ernie_vl
    from ernie_vl.app.cli import main

    data = make_folder(tmp_path / "data", per_class=4)
    model_dir = tmp_path / "model"
    ernie_vl.create_model("test").save_pretrained(model_dir)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    files = [str(data / "red_square" / "0.png"), str(data / "blue_bar" / "1.png")]
    assert main(["classify", str(model_dir), *files, "--labels", str(tmp_path / "classes.txt"), "--json",
                 "--topk", "2", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == files and all(len(r["labels"]) == 2 for r in rows)
    assert all(0 < sum(r["scores"]) <= 1 + 1e-6 and r["scores"] == sorted(r["scores"], reverse=True) for r in rows)
    assert set(rows[0]["labels"]) <= set(CLASSES)

    out = tmp_path / "probe-run"
    assert main(["linear-probe", str(model_dir), str(data), str(data), "--out", str(out), "--workers", "0",
                 "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 12 and report["num_train"] == 12 and 0 <= report["top1"] <= 1
    assert main(["classify", str(model_dir), *files, str(tmp_path / "nope.png"), "--probe", str(out / "probe"),
                 "--json", "--no-progress"]) == 1  # the missing file is reported, the others classified
    rows = json.loads(capsys.readouterr().out)
    from retrieval.probe import LinearProbe
    from retrieval.embed import embed_images

    probe = LinearProbe.load(out / "probe")
    model = ernie_vl.ErnieVL.from_pretrained(model_dir)
    emb = torch.from_numpy(embed_images(model, files, preprocess=model.preprocess, progress=False).embeddings)
    want = probe.logits(emb).softmax(-1).max(1)
    assert [r["scores"][0] for r in rows[:2]] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert rows[2]["error"] and "no such file" in rows[2]["error"]


def test_pooled_features_are_the_visual_head_input_and_a_pooled_probe_classifies(tmp_path, capsys):
    import ernie_vl
    from ernie_vl.app.cli import main
    from ernie_vl.app.image_features import ImageFeatures, check_features
    from retrieval.probe import LinearProbe

    model = ernie_vl.create_model("test").eval()
    images = torch.randn(3, 3, 32, 32)
    pooled = ImageFeatures(model, "pooled")
    with torch.no_grad():
        got = pooled.encode_image(images)
        # the head's input: projecting it gives the (unnormalised) embedding
        assert torch.allclose(model.visual_head(got), model.image_features(images, routing=False).embeds, atol=1e-6)
        assert torch.allclose(ImageFeatures(model).encode_image(images), model.encode_image(images))
    assert got.shape[0] == 3 and not torch.allclose(got.norm(dim=-1), torch.ones(3))
    assert not pooled.normalized and ImageFeatures(model).normalized
    with pytest.raises(ValueError, match="unknown image features 'pre'; valid: embedding, pooled, tokens, layers"):
        check_features("pre")
    for kind in ("pooled", "tokens", "layers"):
        with pytest.raises(ValueError, match=f"features '{kind}' need an ErnieVL model"):
            ImageFeatures(torch.nn.Linear(2, 2), kind)

    data = make_folder(tmp_path / "data", per_class=4)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out = tmp_path / "probe-run"
    assert main(["linear-probe", str(model_dir), str(data), str(data), "--out", str(out), "--workers", "0",
                 "--features", "pooled", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["features"] == "pooled" and report["num_train"] == 12
    probe = LinearProbe.load(out / "probe")
    assert probe.features == "pooled" and probe.weight.shape[1] == got.shape[1]
    files = [str(data / "red_square" / "0.png"), str(data / "blue_bar" / "1.png")]
    assert main(["classify", str(model_dir), *files, "--probe", str(out / "probe"), "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    from PIL import Image as PILImage

    x = torch.stack([model.preprocess(PILImage.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        want = probe.logits(pooled.encode_image(x)).softmax(-1).max(1)
    assert [r["scores"][0] for r in rows] == pytest.approx(want.values.tolist(), abs=1e-5)

    # the multi-layer features through the same commands: probe fitted on them, classify reads them back
    layered = ImageFeatures(model, "layers")
    out = tmp_path / "probe-layers"
    assert main(["linear-probe", str(model_dir), str(data), str(data), "--out", str(out), "--workers", "0",
                 "--features", "layers", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["features"] == "layers"
    probe = LinearProbe.load(out / "probe")
    assert main(["classify", str(model_dir), *files, "--probe", str(out / "probe"), "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        want = probe.logits(layered.encode_image(x)).softmax(-1).max(1)
    assert probe.features == "layers" and probe.weight.shape[1] == layered.encode_image(x).shape[1]
    assert [r["scores"][0] for r in rows] == pytest.approx(want.values.tolist(), abs=1e-5)
