"""The direction of imports (DESIGN.md): walks every module's imports with ``ast`` and fails on a wrong-way one.

- ``encoders``, ``retrieval`` and ``video`` never import ``ernie_vl``; ``encoders`` and ``retrieval`` never import
  ``video``; ``video`` may use ``retrieval``'s model-agnostic helpers (prompt ensembling, ``collate_skip_none``);
- the model core (``ernie_vl`` outside ``app/``, ``train/`` and ``data/``) imports neither ``retrieval``, ``video``,
  the training code nor the applications;
- training (``ernie_vl.train``, ``ernie_vl.data``) never imports the applications (``ernie_vl.app``).

Imports inside functions count, and so do module names handed to ``importlib.import_module`` as string literals
and the values of the lazy-export tables (``_EXPORTS``) that package ``__init__`` files resolve on first use.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("encoders", "retrieval", "video", "ernie_vl")

# (layer of the importing module, forbidden module prefixes)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "encoders": ("ernie_vl", "retrieval", "video"),
    "retrieval": ("ernie_vl", "video"),
    "video": ("ernie_vl",),
    "core": ("ernie_vl.app", "ernie_vl.train", "ernie_vl.data", "retrieval", "video"),
    "training": ("ernie_vl.app",),
    "app": (),
}
# The ``python -m ernie_vl`` shim only starts the CLI.
ENTRY_POINTS = {"ernie_vl.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if top != "ernie_vl":
        return top
    sub = module.split(".")[1] if "." in module else ""
    if sub == "app":
        return "app"
    if sub in ("train", "data"):
        return "training"
    return "core"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    # ``from pkg import sub`` may name a submodule: keep both readings
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every (line, module) that the file at ``path`` imports, however it does so."""
    module = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, name) for name in _resolve(module, path.name == "__init__.py", node)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                found += [(v.lineno, v.value) for v in node.value.values
                          if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return found


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def wrong_way_imports(path: Path) -> list[str]:
    module = module_name(path)
    if module in ENTRY_POINTS:
        return []
    forbidden = FORBIDDEN[layer_of(module)]
    return [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in imported_modules(path)
            if any(_is_under(name, prefix) for prefix in forbidden)]


SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_package_is_walked():
    layers = {layer_of(module_name(p)) for p in SOURCES}
    assert layers == set(FORBIDDEN), layers
    assert (ROOT / "ernie_vl" / "app" / "cli" / "__init__.py") in SOURCES


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_wrong_way_import(pkg):
    bad = [msg for p in SOURCES if module_name(p).split(".")[0] == pkg for msg in wrong_way_imports(p)]
    assert not bad, "wrong-way imports (see DESIGN.md):\n" + "\n".join(bad)


def test_walker_catches_each_way_of_importing(tmp_path, monkeypatch):
    # a fake core module that imports upward in every form the walker must see
    pkg = tmp_path / "ernie_vl" / "moe"
    pkg.mkdir(parents=True)
    (tmp_path / "ernie_vl" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    src = pkg / "bad.py"
    src.write_text(
        "import video.decode\n"
        "from ..app import cli\n"
        "def f():\n"
        "    from retrieval import Index\n"
        "    import importlib\n"
        "    return importlib.import_module('ernie_vl.train.trainer')\n"
        "_EXPORTS = {'X': 'ernie_vl.data.sources'}\n"
        "from ..model import ErnieVL\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    bad = wrong_way_imports(src)
    named = " ".join(bad)
    for name in ("video.decode", "ernie_vl.app", "retrieval", "ernie_vl.train.trainer", "ernie_vl.data.sources"):
        assert name in named, (name, bad)
    assert "ernie_vl.model" not in named
    assert sorted({int(msg.split(":")[1].split()[0]) for msg in bad}) == [1, 2, 4, 6, 7]


def test_layers():
    assert layer_of("ernie_vl.model") == "core"
    assert layer_of("ernie_vl") == "core"
    assert layer_of("ernie_vl.moe.layer") == "core"
    assert layer_of("ernie_vl.train.trainer") == "training"
    assert layer_of("ernie_vl.data.sources") == "training"
    assert layer_of("ernie_vl.app.serve.app") == "app"
    assert layer_of("video.decode") == "video"


# leaves of the core: what they may import from the project (DESIGN.md: kernels as leaves under moe/kernels/)
LEAVES = {
    "ernie_vl.moe.kernels": ("ernie_vl.moe.kernels", "ernie_vl.moe.activation", "ernie_vl.runtime"),
    "ernie_vl.runtime": (),
    "ernie_vl.moe.activation": ("encoders.activations",),
    "encoders.activations": (),
    "encoders.lazy": (),
}


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_only_downward(leaf):
    allowed = LEAVES[leaf]
    files = [p for p in SOURCES if _is_under(module_name(p), leaf)]
    assert files, leaf
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in files for line, name in imported_modules(p)
           if name.split(".")[0] in PACKAGES and name != "ernie_vl" and not any(_is_under(name, a) for a in allowed)]
    assert not bad, f"{leaf} may import only {allowed or 'nothing'} from the project:\n" + "\n".join(bad)
