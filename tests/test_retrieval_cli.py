"""`ernie-vl index / search / eval-retrieval` end to end, and ernie_vl.app.hub.load_model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ernie_vl.app.cli import main
from ernie_vl.app.hub import load_model
from retrieval.index import Index

from _retrieval_helpers import write_captions_csv, write_color_image

TINY_OPEN_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_open_clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    return f"open_clip:local-dir:{folder}"


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (128, 0, 255)]
    for i, rgb in enumerate(colors):
        write_color_image(root / f"img{i}.png", rgb, size=(20 + i, 16))
    (root / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    return root


def test_hub_open_clip_is_deterministic(tiny_spec):
    a, b = load_model(tiny_spec), load_model(tiny_spec)
    assert a.model_id == b.model_id and a.model_id.startswith("open_clip:local-dir:")
    tokens = a.tokenizer(["a red square"])
    torch.testing.assert_close(a.model.encode_text(tokens), b.model.encode_text(tokens))
    assert a.embedding_dim == 16
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_model("open_clip:NoSuchNet")
    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        load_model("/no/such/folder")


def test_index_search_cli_roundtrip(tiny_spec, photos, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", tiny_spec, str(photos), "--out", str(out), "--workers", "0", "--no-progress",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 6 and report["added"] == 6 and report["kind"] == "flat"
    assert [p.endswith("corrupt.jpg") for p, _ in report["failures"]] == [True]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["model_spec"] == tiny_spec and manifest["count"] == 6

    # image query: the stored image itself comes first with cosine 1
    gallery = tmp_path / "hits.html"
    assert main(["search", str(out), "--image", str(photos / "img2.png"), "-k", "3", "--json",
                 "--gallery", str(gallery)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["metadata"]["path"] == "img2.png"
    assert result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert gallery.read_text().count("<figure>") == 3

    # text query agrees with a direct computation
    assert main(["search", str(out), "a yellow square", "-k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    loaded = load_model(tiny_spec)
    index = Index.load(out)
    q = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(["a yellow square"])), dim=-1)
    want = index.search(q.detach().numpy(), 6)
    assert [h["id"] for h in hits] == want[0][0].tolist()

    # incremental: one new file -> one embedded, the rest unchanged
    write_color_image(photos / "img_new.png", (10, 20, 30))
    assert main(["index", tiny_spec, str(photos), "--out", str(out), "--workers", "0", "--no-progress",
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["added"], again["unchanged"], again["count"]) == (1, 6, 7)

    # bad usage -> exit code 2 with a message, no traceback
    assert main(["search", str(out)]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "missing"), "x"]) == 2


def test_index_refuses_other_model(tiny_spec, photos, tmp_path, capsys):
    out = tmp_path / "idx"
    Index.build(np.eye(16, dtype=np.float32)[:2], model_id="someone-else", info={"root": str(photos)}).save(out)
    assert main(["index", tiny_spec, str(photos), "--out", str(out), "--workers", "0", "--no-progress"]) == 2
    assert "someone-else" in capsys.readouterr().err


def test_eval_retrieval_cli(tiny_spec, photos, tmp_path, capsys):
    rows = [(f"photos/img{i}.png", f"caption {i} {j}") for i in range(6) for j in range(2)]
    rows.append(("photos/corrupt.jpg", "lost"))
    csv_path = write_captions_csv(tmp_path / "caps.csv", rows)
    out_json = tmp_path / "recall.json"
    assert main(["eval-retrieval", tiny_spec, str(csv_path), "--workers", "0", "--no-progress",
                 "--out", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["num_images"] == 6 and report["num_captions"] == 12 and report["skipped_captions"] == 1
    rec = report["recall"]
    assert set(rec) == {f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
    assert rec["text_to_image_R@10"] == 1.0 and rec["image_to_text_R@10"] == 1.0  # only 6 images
    assert all(0.0 <= v <= 1.0 for v in rec.values())


def test_hub_loads_ernie_vl_checkpoint(tmp_path, photos):
    ernie_vl = pytest.importorskip("ernie_vl")
    model = ernie_vl.create_model("test")
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.model_id == loaded.model.model_id and loaded.model_id.startswith("ernie-vl:")
    assert loaded.preprocess is loaded.model.preprocess and loaded.tokenizer is loaded.model.tokenizer
    from retrieval.folder import index_folder
    from retrieval.search import search_image

    index, report = index_folder(loaded.model, photos, model_id=loaded.model_id, progress=False)
    assert len(index) == 6 and len(report.failures) == 1
    hits = search_image(loaded.model, index, photos / "img4.png", k=1)
    assert hits[0].metadata["path"] == "img4.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_search_cli_nprobe_and_rerank_on_an_ivfpq_index_from_parts(tiny_spec, tmp_path, capsys):
    from retrieval.backends import IndexParams
    from retrieval.parts import write_part

    loaded = load_model(tiny_spec)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((4, 16)).astype(np.float32)
    x = rng.standard_normal((1200, 4)).astype(np.float32) @ basis + 0.1 * rng.standard_normal((1200, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    emb = tmp_path / "emb"
    emb.mkdir()
    for s, start in enumerate(range(0, 1200, 400)):
        rows = [{"id": start + i, "path": f"{start + i}.png"} for i in range(400)]
        write_part(emb, 0, s, start, start + 400, x[start:start + 400], rows, [], loaded.model_id, "float16")
    out = tmp_path / "idx"
    Index.build_from_parts(emb, kind="ivfpq", memory_budget="64M", params=IndexParams(ivf_nlist=16, pq_m=4),
                           info={"model_spec": tiny_spec}).save(out)
    index = Index.load(out)
    q = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(["a red square"])), dim=-1)
    q = q.detach().numpy()
    stored = x.astype(np.float16).astype(np.float32)

    def cli(*flags):
        assert main(["search", str(out), "a red square", "-k", "5", "--json", *flags]) == 0
        hits = json.loads(capsys.readouterr().out)["hits"]
        return [h["id"] for h in hits], np.array([h["score"] for h in hits])

    for flags, kwargs in (((), {}), (("--nprobe", "2", "--rerank", "0"), {"nprobe": 2, "rerank": 0}),
                          (("--nprobe", "16", "--rerank", "40"), {"nprobe": 16, "rerank": 40})):
        ids, scores = cli(*flags)
        want_ids, want_scores = index.search(q, 5, **kwargs)
        assert ids == want_ids[0].tolist()
        np.testing.assert_allclose(scores, want_scores[0], rtol=1e-5, atol=1e-6)
    exact_ids, exact_scores = cli("--nprobe", "16", "--rerank", "40")   # re-ranked: the float vectors' scores
    np.testing.assert_allclose(exact_scores, stored[exact_ids] @ q[0], atol=1e-5)
    pq_ids, pq_scores = cli("--nprobe", "16", "--rerank", "0")          # PQ scores: off the float ones
    assert np.abs(pq_scores - stored[pq_ids] @ q[0]).max() > 1e-4
    assert sorted(exact_ids) == sorted((np.argsort(-(stored @ q[0]), kind="stable")[:5]).tolist())  # all lists
    for flags, message in ((("--rerank", "3"), "--rerank is the PQ shortlist"), (("--nprobe", "0"), "--nprobe must")):
        assert main(["search", str(out), "a red square", "-k", "5", *flags]) == 2
        assert message in capsys.readouterr().err
    flat = tmp_path / "flat"
    Index.build(x[:10], model_id=loaded.model_id, info={"model_spec": tiny_spec}).save(flat)
    assert main(["search", str(flat), "a red square", "--nprobe", "4"]) == 2
    assert "apply to ivfpq indexes" in capsys.readouterr().err
