"""embed_images / embed_texts, folder indexing (incremental), search_text / search_image, gallery."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval
from retrieval.embed import embed_images, embed_texts
from retrieval.folder import index_folder
from retrieval.gallery import write_gallery
from retrieval.index import Index, IndexMismatchError
from retrieval.search import search_image, search_text

from _retrieval_helpers import ColorModel, write_color_image

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture()
def photo_dir(tmp_path):
    root = tmp_path / "photos"
    for name, rgb in COLORS.items():
        write_color_image(root / f"{name}.png", rgb)
    write_color_image(root / "sub" / "dark_red.jpg", (120, 0, 0))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "readme.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_embed_images_skips_bad_files(photo_dir, num_workers):
    model = ColorModel()
    paths = sorted(photo_dir.rglob("*.*"))
    res = embed_images(model, paths, batch_size=2, num_workers=num_workers, progress=False)
    names = [os.path.basename(p) for p in res.paths]
    assert names == ["blue.png", "green.png", "red.png", "dark_red.jpg"]
    assert res.embeddings.shape == (4, 3) and res.embeddings.dtype == np.float32
    np.testing.assert_allclose(res.embeddings[0], [0, 0, 1], atol=1e-4)
    np.testing.assert_allclose(res.embeddings[3], [1, 0, 0], atol=0.02)  # JPEG
    failed = sorted(os.path.basename(p) for p, _ in res.failures)
    assert failed == ["broken.jpg", "readme.txt"] and res.num_failed == 2


def test_embed_texts_batches_and_normalises():
    model = ColorModel()
    emb = embed_texts(model, ["red", "a blue thing", "red and green"], batch_size=2)
    assert model.text_batch_sizes == [2, 1]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[1].argmax() == 2 and emb[2][0] == pytest.approx(emb[2][1])
    with pytest.raises(TypeError, match="strings"):
        embed_texts(model, ["ok", 3])


def test_folder_index_search_and_incremental_update(photo_dir, tmp_path):
    model = ColorModel()
    index, report = index_folder(model, photo_dir, model_id=model.model_id, batch_size=2, progress=False)
    assert (report.added, report.updated, report.removed, len(report.failures)) == (4, 0, 0, 1)
    assert index.kind == "flat" and len(index) == 4 and index.info["root"] == str(photo_dir.resolve())
    hits = search_text(model, index, "something blue", k=2)
    assert hits[0].metadata["path"] == "blue.png" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.rank for h in hits] == [0, 1]
    hits = search_image(model, index, photo_dir / "sub" / "dark_red.jpg", k=2)
    assert {h.metadata["path"] for h in hits} == {"red.png", "sub/dark_red.jpg"}
    batch = search_text(model, index, ["green", "blue"], k=1)
    assert [h[0].metadata["path"] for h in batch] == ["green.png", "blue.png"]

    out = index.save(tmp_path / "idx")
    # second run: one new file, one changed, one deleted -> only two images embedded
    write_color_image(photo_dir / "new_blue.png", (0, 0, 200))
    write_color_image(photo_dir / "green.png", (0, 0, 255), size=(5, 5))  # now blue, new size
    (photo_dir / "red.png").unlink()
    model.image_batch_sizes.clear()
    index2, report2 = index_folder(model, photo_dir, index=Index.load(out), model_id=model.model_id, progress=False)
    assert (report2.added, report2.updated, report2.removed, report2.unchanged) == (1, 1, 1, 2)
    assert sum(model.image_batch_sizes) == 2
    paths = sorted(m["path"] for _, m in index2.items())
    assert paths == ["blue.png", "green.png", "new_blue.png", "sub/dark_red.jpg"]
    top = search_text(model, index2, "blue", k=3)
    assert {h.metadata["path"] for h in top} == {"blue.png", "green.png", "new_blue.png"}


def test_search_refuses_other_model(photo_dir):
    model = ColorModel()
    index, _ = index_folder(model, photo_dir, model_id="some-other-model", progress=False)
    with pytest.raises(IndexMismatchError, match="some-other-model"):
        search_text(model, index, "red")
    with pytest.raises(ValueError, match="non-empty"):
        search_text(model, Index.build(np.eye(3, dtype=np.float32)), "  ")


def test_search_with_open_clip_random_init(photo_dir):
    open_clip = pytest.importorskip("open_clip")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    res = embed_images(model, sorted(photo_dir.glob("*.png")), preprocess=preprocess, progress=False)
    index = retrieval.Index.build(res.embeddings, metadata=[{"path": p} for p in res.paths])
    # querying with a stored image finds itself first, with cosine 1
    hits = search_image(model, index, res.paths[1], k=3, preprocess=preprocess)
    assert hits[0].metadata["path"] == res.paths[1] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    text_hits = search_text(model, index, "a photo", k=3, tokenizer=tokenizer)
    want = res.embeddings @ embed_texts(model, ["a photo"], tokenizer=tokenizer)[0]
    assert [h.metadata["path"] for h in text_hits] == [res.paths[i] for i in np.argsort(-want)]
    np.testing.assert_allclose([h.score for h in text_hits], np.sort(want)[::-1], atol=1e-5)


@pytest.mark.parametrize("suffix", [".html", ".png"])
def test_gallery(photo_dir, tmp_path, suffix):
    model = ColorModel()
    index, _ = index_folder(model, photo_dir, progress=False)
    hits = search_text(model, index, "red", k=3)
    out = write_gallery(hits, tmp_path / f"g{suffix}", root=index.info["root"], title="red", thumb=32)
    if suffix == ".html":
        text = out.read_text()
        assert text.count("<figure>") == 3 and "red.png" in text and "data:image/jpeg;base64," in text
    else:
        sheet = Image.open(out)
        assert sheet.size == (3 * 40 + 8, 24 + 32 + 16 + 8)
        # the first thumbnail is the red image
        assert sheet.getpixel((8 + 16, 24 + 16))[:3] in {(255, 0, 0), (120, 0, 0)}
    with pytest.raises(ValueError, match="must end in"):
        write_gallery(hits, tmp_path / "g.gif")
