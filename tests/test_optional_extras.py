"""`pip install ernie-vl` is the model, retrieval and video; serving and figures are extras whose absence gives a
one-line install hint (simulated here by making the import fail)."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch

from encoders.lazy import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]


def _forget(monkeypatch, prefix: str) -> None:
    """Drop ``prefix`` and its submodules from sys.modules (restored after the test) so they import afresh."""
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        monkeypatch.delitem(sys.modules, name)


def _absent(monkeypatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_the_extras_are_declared_and_the_core_needs_none_of_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for name in ("fastapi", "uvicorn", "multipart", "matplotlib"):
        assert name not in core, name
    extras = project["optional-dependencies"]
    assert {"serve", "plots", "all", "dev"} <= set(extras)
    assert any(d.startswith("fastapi") for d in extras["serve"]) and any(d.startswith("uvicorn") for d in extras["serve"])
    assert any(d.startswith("python-multipart") for d in extras["serve"])
    assert extras["plots"] == ["matplotlib>=3.7"] and extras["all"] == ["ernie-vl[serve,plots]"]
    assert '".[all,dev]"' in (ROOT / "Makefile").read_text()


def test_require_names_the_extra_in_one_line(monkeypatch):
    _absent(monkeypatch, "matplotlib", "matplotlib.pyplot")  # also when another test imported it before
    with pytest.raises(MissingExtraError) as err:
        require("matplotlib.pyplot", "plots", "the figures")
    assert str(err.value) == "the figures needs matplotlib, which is not installed: pip install 'ernie-vl[plots]'"
    assert isinstance(err.value, ImportError)
    assert require("json", "plots", "x") is sys.modules["json"]


def test_server_without_fastapi_says_which_extra(monkeypatch):
    _forget(monkeypatch, "ernie_vl.app.serve")
    _absent(monkeypatch, "fastapi", "fastapi.responses")
    with pytest.raises(MissingExtraError, match=r"ernie-vl serve\) needs fastapi.*pip install 'ernie-vl\[serve\]'$"):
        import ernie_vl.app.serve  # noqa: F401


def test_cli_demo_without_matplotlib_prints_the_hint_and_exits_2(monkeypatch, tmp_path, capsys):
    from ernie_vl.app.cli import main

    _forget(monkeypatch, "ernie_vl.app.demo")
    _absent(monkeypatch, "matplotlib")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ernie-vl demo: error: the demo's figures (ernie-vl demo) needs matplotlib, which is not "
                   "installed: pip install 'ernie-vl[plots]'")
    assert not (tmp_path / "demo").exists()  # nothing started


def test_video_evaluation_writes_its_json_without_matplotlib(monkeypatch, tmp_path):
    from video.plots import save_confusion_matrix

    _absent(monkeypatch, "matplotlib")
    with pytest.warns(UserWarning, match=r"pip install 'ernie-vl\[plots\]'; .*confusion.png not written"):
        save_confusion_matrix(torch.tensor([[2, 0], [1, 1]]), ["a", "b"], tmp_path / "confusion.png",
                              tmp_path / "confusion.json")
    assert (tmp_path / "confusion.json").is_file() and not (tmp_path / "confusion.png").exists()
