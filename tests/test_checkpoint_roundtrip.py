"""save_pretrained / from_pretrained: bit-identical round trip, strict keys, damaged files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ernie_vl
from ernie_vl.checkpoint import WEIGHTS_NAME, tensors_digest
from tests._model_helpers import make_batch


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[ernie_vl.ErnieVL, Path, "ernie_vl.checkpoint.SavedCheckpoint"]:
    torch.manual_seed(0)
    model = ernie_vl.create_model("test", class_names=["a", "b", "c"]).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    result = model.save_pretrained(str(folder))
    assert model.model_id == "ernie-vl:test"  # saving changes nothing on the model
    assert result.directory == folder and result.model_id.startswith("ernie-vl:test:sha256-")
    return model, folder, result


def test_round_trip_is_bit_identical(saved) -> None:
    model, folder, result = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ernie_vl.ErnieVL.from_pretrained(str(folder))
    batch = make_batch(model, pairs=2, videos=1)
    with torch.no_grad():
        for fn, x in (("encode_image", batch.images), ("encode_text", batch.texts),
                      ("encode_video", batch.videos), ("classify_video", batch.videos)):
            assert torch.equal(getattr(model, fn)(x), getattr(loaded, fn)(x)), fn
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.cfg == model.cfg
    # the id follows the weights, not the folder: what the save returned, the reload and a moved copy agree
    assert loaded.model_id == result.model_id
    assert loaded.model_id == f"ernie-vl:test:sha256-{result.sha256[:16]}"


def test_model_id_survives_a_move_and_changes_with_the_weights(saved, tmp_path) -> None:
    model, folder, result = saved
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in folder.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    assert ernie_vl.ErnieVL.from_pretrained(str(moved)).model_id == result.model_id
    other = ernie_vl.create_model("test", class_names=["a", "b", "c"])
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert other.save_pretrained(str(tmp_path / "other")).model_id != result.model_id


def _rewrite(folder: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors = edit(tensors)
    save_file(tensors, str(dst / WEIGHTS_NAME), metadata={"format": "pt", "sha256": tensors_digest(tensors)})
    return dst


def test_missing_and_unexpected_keys_are_all_named(saved, tmp_path) -> None:
    _, folder, _ = saved

    def edit(t):
        t = dict(t)
        t.pop("classifier.bias")
        t.pop("logits.log_scale")
        t["extra.weight"] = torch.zeros(2)
        t["text_head.proj.weight"] = torch.zeros(3, 3)
        return t

    bad = _rewrite(folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as err:
        ernie_vl.ErnieVL.from_pretrained(str(bad))
    msg = str(err.value)
    for name in ("classifier.bias", "logits.log_scale", "extra.weight", "text_head.proj.weight: expected (32, 32), got (3, 3)"):
        assert name in msg


def test_truncated_file_gives_a_clear_error(saved, tmp_path) -> None:
    _, folder, _ = saved
    dst = tmp_path / "trunc"
    dst.mkdir()
    (dst / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / WEIGHTS_NAME).read_bytes()
    for size in (4, 100, len(data) - 10):
        (dst / WEIGHTS_NAME).write_bytes(data[:size])
        with pytest.raises(ValueError, match="truncated|corrupt"):
            ernie_vl.ErnieVL.from_pretrained(str(dst))


def test_tampered_tensor_bytes_are_detected(saved, tmp_path) -> None:
    _, folder, _ = saved
    dst = tmp_path / "tamper"
    dst.mkdir()
    (dst / "config.json").write_text((folder / "config.json").read_text())
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-20] ^= 0xFF  # flip bits inside the last tensor's data
    (dst / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified or corrupted"):
        ernie_vl.ErnieVL.from_pretrained(str(dst))


def test_config_errors_name_the_problem(saved, tmp_path) -> None:
    _, folder, _ = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "nowhere"))
    dst = tmp_path / "cfg"
    dst.mkdir()
    data = json.loads((folder / "config.json").read_text())
    data["head"]["pooling_style"] = "max"
    (dst / "config.json").write_text(json.dumps(data))
    (dst / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"head: unknown key\(s\) \['pooling_style'\]; valid keys: \['embed_dim'"):
        ernie_vl.ErnieVL.from_pretrained(str(dst))
    (dst / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ernie_vl.ErnieVL.from_pretrained(str(dst))


def test_metadata_is_an_explicit_argument_and_comes_back_on_load(tmp_path) -> None:
    model = ernie_vl.ErnieVL(ernie_vl.load_config("test"), checkpoint_metadata={"trained_on": "pairs"})
    model.save_pretrained(str(tmp_path / "a"), metadata={"note": "first run"})
    assert model.checkpoint_metadata == {"trained_on": "pairs"}  # the argument did not stick to the model
    loaded = ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "a"))
    assert loaded.checkpoint_metadata == {"trained_on": "pairs", "note": "first run"}
    loaded.save_pretrained(str(tmp_path / "b"))  # a load-save cycle keeps the provenance
    assert ernie_vl.ErnieVL.from_pretrained(str(tmp_path / "b")).checkpoint_metadata == loaded.checkpoint_metadata
    with pytest.raises(ValueError, match=r"keys \['sha256'\] are written by save_pretrained itself"):
        model.save_pretrained(str(tmp_path / "c"), metadata={"sha256": "forged"})
    with pytest.raises(TypeError, match="str to str"):
        model.save_pretrained(str(tmp_path / "c"), metadata={"steps": 3})


def test_quantization_scheme_is_read_from_the_structure() -> None:
    from ernie_vl.quantize import SCHEMES, quantization_scheme, quantize_int8

    model = ernie_vl.create_model("test")
    assert quantization_scheme(model) is None
    v1 = quantize_int8(model, scheme=SCHEMES[0])
    assert quantization_scheme(v1) == SCHEMES[0] and not hasattr(v1, "_checkpoint_metadata")
    assert quantization_scheme(quantize_int8(model)) in SCHEMES
