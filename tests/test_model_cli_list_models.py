"""`ernie-vl list-models` prints every preset with its parameter count."""
from __future__ import annotations

import json

from ernie_vl.app.cli import main


def test_list_models_table_and_json(capsys) -> None:
    assert main(["list-models"]) == 0
    table = capsys.readouterr().out
    for name in ("test", "tiny", "base", "large"):
        assert f"\n{name} " in table
    assert main(["list-models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["test", "tiny", "ernie45-tiny", "base", "large"]
    assert rows[0]["params"] < 1_000_000 < rows[1]["params"]
    assert all(r["active_params"] <= r["params"] for r in rows)
