"""Integrity: model ids come from the weights; indexes refuse bad vectors, duplicate ids and outside files."""
from __future__ import annotations

import json

import pytest

import ernie_vl


def test_model_id_is_computed_from_the_weights_and_a_stored_one_only_compared(tmp_path):
    folder = tmp_path / "ckpt"
    model = ernie_vl.create_model("test")
    model.save_pretrained(str(folder))
    genuine = ernie_vl.ErnieVL.from_pretrained(str(folder)).model_id
    assert genuine == model.model_id and genuine.startswith("ernie-vl:test:sha256-")
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
