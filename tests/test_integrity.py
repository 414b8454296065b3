"""Integrity: model ids come from the weights; indexes refuse bad vectors, duplicate ids and outside files."""
from __future__ import annotations

import json

import pytest

import ernie_vl


def test_model_id_is_computed_from_the_weights_and_a_stored_one_only_compared(tmp_path):
    folder = tmp_path / "ckpt"
    model = ernie_vl.create_model("test")
    saved = model.save_pretrained(str(folder))
    genuine = ernie_vl.ErnieVL.from_pretrained(str(folder)).model_id
    assert genuine == saved.model_id and genuine.startswith("ernie-vl:test:sha256-")
    # a random model whose config.json claims another model's id does not get that id
    other = tmp_path / "forged"
    ernie_vl.create_model("test").save_pretrained(str(other))
    data = json.loads((other / "config.json").read_text())
    data["model_id"] = genuine
    (other / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="config.json says model_id .* but the weights give"):
        forged = ernie_vl.ErnieVL.from_pretrained(str(other))
    assert forged.model_id != genuine and forged.model_id.startswith("ernie-vl:test:sha256-")
    # a stored id that matches is accepted silently
    data["model_id"] = forged.model_id
    (other / "config.json").write_text(json.dumps(data))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ernie_vl.ErnieVL.from_pretrained(str(other)).model_id == forged.model_id


# ----------------------------------------------------------------------------- indexes

import base64  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from _retrieval_helpers import write_color_image  # noqa: E402
from ernie_vl.app.cli import main  # noqa: E402
from retrieval.gallery import OUTSIDE_NOTE, write_gallery  # noqa: E402
from retrieval.index import Index, IndexMismatchError  # noqa: E402
from retrieval.search import SearchHit  # noqa: E402


def _unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_build_and_add_refuse_non_finite_vectors(bad):
    x = _unit(4)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        Index.build(x, kind="flat")
    index = Index.build(_unit(4), kind="hnsw")
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(x)
    assert len(index) == 4


def test_build_refuses_duplicate_ids():
    with pytest.raises(ValueError, match="duplicates"):
        Index.build(_unit(3), ids=[5, 7, 5])
    index = Index.build(_unit(3), ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"already in the index: \[2\]"):
        index.add(_unit(1), ids=[2])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_load_refuses_non_finite_vectors(kind, tmp_path):
    out = tmp_path / "idx"
    index = Index.build(_unit(6), kind=kind)
    x = _unit(1, seed=3)
    x[0, 0] = np.nan
    index._store.add(x)  # past the checks, as a foreign tool could have written it
    index._items.append(np.array([6]), [{}])
    index._next_id = 7
    index.save(out)
    with pytest.raises(IndexMismatchError, match=r"1 vectors hold NaN or inf \(ids \[6\]\)"):
        Index.load(out)


def test_load_refuses_duplicate_ids_and_bad_metadata(tmp_path):
    out = tmp_path / "idx"
    Index.build(_unit(4), metadata=[{"path": f"{i}.png"} for i in range(4)]).save(out)
    assert len(Index.load(out)) == 4
    np.save(out / "ids.npy", np.array([0, 1, 1, 3], np.int64))  # same size: only the content check can see it
    with pytest.raises(IndexMismatchError, match=r"duplicate ids \[1\]"):
        Index.load(out)
    np.save(out / "ids.npy", np.array([0, 1, 2, 3], np.int64))
    lines = (out / "metadata.jsonl").read_text().splitlines()
    lines[2] = '["x.png"    ]'.ljust(len(lines[2]))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(IndexMismatchError, match=r"metadata rows \[2\] are not JSON objects"):
        Index.load(out)


# ----------------------------------------------------------------------------- manifests and downloads


def _fake_index(tmp_path, spec: str):
    out = tmp_path / "idx"
    Index.build(_unit(2, d=16), metadata=[{"path": "a.png"}, {"path": "b.png"}], model_id="x",
                info={"root": str(tmp_path), "model_spec": spec}).save(out)
    return out


@pytest.mark.parametrize("spec", ["open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip:hf-hub:someone/clip-model",
                                  "open_clip:xlm-roberta-base-ViT-B-32"])
def test_search_never_downloads_the_model_a_manifest_names(spec, tmp_path, monkeypatch, capsys):
    from ernie_vl.app import hub

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded from the manifest's spec")

    monkeypatch.setattr(hub, "load_model", no_load)
    out = _fake_index(tmp_path, spec)
    assert main(["search", str(out), "a dog"]) == 2
    err = capsys.readouterr().err
    assert "never starts a download" in err and f"--model {spec}" in err


def test_local_specs_load_without_download(tmp_path):
    from ernie_vl.app.hub import download_reason

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert download_reason(str(tmp_path)) is None  # an ErnieVL checkpoint folder
    assert download_reason("open_clip:ViT-B-32") is None  # random init
    assert download_reason(f"open_clip:ViT-B-32:{weights}") is None  # a local weights file
    assert "downloaded" in download_reason("open_clip:ViT-B-32:openai")


# ----------------------------------------------------------------------------- gallery


def _thumb_colours(page: str) -> list[tuple[int, int, int]]:
    """The centre pixel of every embedded thumbnail of a gallery page."""
    out = []
    for data in re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page):
        img = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        out.append(img.getpixel((img.width // 2, img.height // 2)))
    return out


def _near(a, b, tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_gallery_reads_only_files_under_the_root(tmp_path):
    root = tmp_path / "photos"
    write_color_image(root / "in.png", (0, 0, 255), size=(32, 32))
    secret = write_color_image(tmp_path / "secret" / "private.png", (255, 0, 0), size=(32, 32))
    (root / "link.png").symlink_to(secret)
    paths = ["in.png", str(secret), "../secret/private.png", "link.png"]
    hits = [SearchHit(id=i, score=1.0 - i / 10, rank=i, metadata={"path": p}) for i, p in enumerate(paths)]
    page = write_gallery(hits, tmp_path / "g.html", root=root, thumb=32).read_text()
    colours = _thumb_colours(page)
    assert _near(colours[0], (0, 0, 255))
    assert all(_near(c, (235, 235, 235)) for c in colours[1:])  # placeholders: the outside file is never read
    assert page.count(OUTSIDE_NOTE) == 3
    page = write_gallery(hits, tmp_path / "g2.html", root=root, thumb=32, allow_outside=True).read_text()
    assert all(_near(c, (255, 0, 0)) for c in _thumb_colours(page)[1:]) and OUTSIDE_NOTE not in page


# ----------------------------------------------------------------------------- non-UTF-8 file names


def test_index_keeps_a_latin1_file_name_and_updates_on_rerun(tmp_path, capsys):
    root = tmp_path / "photos"
    write_color_image(root / "plain.png", (0, 0, 255), size=(32, 32))
    name = os.fsdecode(b"caf\xe9 cr\xe8me.png")  # Latin-1 bytes: not UTF-8
    try:
        write_color_image(root / name, (255, 0, 0), size=(32, 32))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    assert b"caf\xe9 cr\xe8me.png" in os.listdir(os.fsencode(root))
    model_dir = tmp_path / "model"
    ernie_vl.create_model("test").save_pretrained(str(model_dir))
    out = tmp_path / "idx"
    args = ["index", str(model_dir), str(root), "--out", str(out), "--workers", "0", "--no-progress", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["count"], report["added"], report["failures"]) == (2, 2, [])
    index = Index.load(out)
    assert sorted(m["path"] for _, m in index.items()) == sorted(["plain.png", name])
    assert os.fsencode(root / name) == os.fsencode(root) + b"/caf\xe9 cr\xe8me.png"  # the exact bytes
    assert main(args) == 0  # rerun: nothing to embed
    again = json.loads(capsys.readouterr().out)
    assert (again["unchanged"], again["added"], again["count"]) == (2, 0, 2)
    write_color_image(root / name, (0, 255, 0), size=(33, 32))  # changed: re-embedded, same item
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["updated"], again["unchanged"], again["count"]) == (1, 1, 2)
    # search prints it readably and the gallery shows the file itself
    assert main(["search", str(out), "a red square", "-k", "2", "--gallery", str(tmp_path / "g.html")]) == 0
    assert "caf\\xe9 cr\\xe8me.png" in capsys.readouterr().out
    page = (tmp_path / "g.html").read_text(encoding="utf-8")
    assert OUTSIDE_NOTE not in page
    assert any(_near(c, (0, 255, 0)) for c in _thumb_colours(page))


def test_load_refuses_an_ivfpq_index_with_broken_codebooks(tmp_path):
    import faiss

    from retrieval.backends import IndexParams

    out = tmp_path / "idx"
    Index.build(_unit(64, d=8), kind="ivfpq", params=IndexParams(ivf_nlist=2, pq_m=2, pq_nbits=4)).save(out)
    assert len(Index.load(out)) == 64  # a clean one loads
    stored = faiss.read_index(str(out / "index.faiss"))
    pq = faiss.downcast_index(stored).pq
    centroids = faiss.vector_to_array(pq.centroids)
    centroids[5] = np.nan
    faiss.copy_array_to_vector(centroids, pq.centroids)
    faiss.write_index(stored, str(out / "index.faiss"))
    with pytest.raises(IndexMismatchError, match="64 vectors hold NaN or inf"):
        Index.load(out)
