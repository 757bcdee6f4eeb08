"""Layers import one way: each ``weakloc`` module imports only from its own layer or a layer to its left.

    leaf (config, errors, checks, text, results, the package itself)
      -> data -> models -> explain -> localize -> evaluate -> train -> report
      -> top (api, cli, demo, __main__)

Every module under ``src/weakloc`` is parsed with :mod:`ast` (nothing is imported), and every
``import weakloc...`` / ``from weakloc... import ...`` / relative import is checked, at module level
and inside functions alike (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import weakloc

PACKAGE = Path(weakloc.__file__).resolve().parent

LAYERS = ["leaf", "data", "models", "explain", "localize", "evaluate", "train", "report", "top"]

# module (or package) name -> layer; the longest matching prefix decides (the package itself,
# ``weakloc``, only for itself: a new top-level module must be given its place here).
LAYER_OF = {
    "weakloc": "top",  # the public API (its names load lazily, by module name)
    "weakloc._version": "leaf",
    "weakloc.config": "leaf",
    "weakloc.errors": "leaf",
    "weakloc.checks": "leaf",
    "weakloc.text": "leaf",
    "weakloc.results": "leaf",
    "weakloc.distributed": "leaf",
    "weakloc.data": "data",
    "weakloc.models": "models",
    "weakloc.explain": "explain",
    "weakloc.localize": "localize",
    "weakloc.evaluate": "evaluate",
    "weakloc.train": "train",
    "weakloc.report": "report",
    "weakloc.api": "top",
    "weakloc.cli": "top",
    "weakloc.demo": "top",
    "weakloc.serve": "top",  # the web app: runs localize and draws with report's overlay
    "weakloc.__main__": "top",
}

# Imports that break the order today and are being moved (issue 17). Remove an entry when its
# import is gone: test_known_violations_still_exist fails on a stale one, so the list only shrinks.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    """``src/weakloc/explain/run.py`` -> ``weakloc.explain.run``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a weakloc module, or None when no entry of :data:`LAYER_OF` covers it."""
    best = None
    for prefix in LAYER_OF:
        if (module == prefix or (prefix != "weakloc" and module.startswith(prefix + "."))) and (best is None or len(prefix) > len(best)):
            best = prefix
    return LAYER_OF[best] if best is not None else None


def _submodule_exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def weakloc_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every weakloc module that ``path`` imports, anywhere in the file.

    ``from weakloc.explain import methods`` names the submodule ``weakloc.explain.methods`` when
    that is a module (else the package); relative imports are resolved against ``path``'s package.
    """
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name == "weakloc" or a.name.startswith("weakloc.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "weakloc" and not target.startswith("weakloc."):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if _submodule_exists(sub) else target))
    return list(dict.fromkeys(found))


def all_imports() -> list[tuple[str, int, str]]:
    """``(importer, line, imported)`` over every module of the package."""
    return [(module_name(p), line, imported)
            for p in sorted(PACKAGE.rglob("*.py")) for line, imported in weakloc_imports(p)]


def violations() -> list[tuple[str, int, str]]:
    out = []
    for importer, line, imported in all_imports():
        a, b = layer_of(importer), layer_of(imported)
        if a is not None and b is not None and LAYERS.index(b) > LAYERS.index(a):
            out.append((importer, line, imported))
    return out


def test_every_module_has_a_layer():
    unplaced = sorted({m for m in map(module_name, PACKAGE.rglob("*.py")) if layer_of(m) is None})
    assert not unplaced, f"give these modules a layer in LAYER_OF: {unplaced}"


def test_imports_go_only_to_the_left():
    new = [f"{importer}:{line} imports {imported} ({layer_of(importer)} -> {layer_of(imported)})"
           for importer, line, imported in violations() if (importer, imported) not in KNOWN_VIOLATIONS]
    assert not new, "imports against the layer order " + " -> ".join(LAYERS) + ":\n" + "\n".join(new)


def test_known_violations_still_exist():
    present = {(importer, imported) for importer, _, imported in violations()}
    stale = sorted(KNOWN_VIOLATIONS - present)
    assert not stale, f"these imports are gone: remove them from KNOWN_VIOLATIONS: {stale}"


def test_the_checker_sees_deferred_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function and a relative import are both found."""
    pkg = tmp_path / "weakloc"
    (pkg / "data").mkdir(parents=True)
    (pkg / "report").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "report" / "__init__.py").write_text("")
    (pkg / "report" / "overlay.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "dataset.py").write_text(
        "def f():\n    from weakloc.report.overlay import fit_size\n"
        "from ..report import overlay\n"
        "import weakloc.report\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    found = weakloc_imports(pkg / "data" / "dataset.py")
    assert sorted(found) == [(2, "weakloc.report.overlay"), (3, "weakloc.report.overlay"), (4, "weakloc.report")]
    assert {(i, m) for i, _, m in violations()} == {("weakloc.data.dataset", "weakloc.report.overlay"),
                                                    ("weakloc.data.dataset", "weakloc.report")}


@pytest.mark.parametrize("module, layer", [
    ("weakloc.text", "leaf"), ("weakloc", "top"), ("weakloc.data.images", "data"), ("weakloc.explain.pipeline", "explain"),
    ("weakloc.report.paths", "report"), ("weakloc.cli", "top"), ("weakloc.textual", None),
])
def test_layer_of(module, layer):
    assert layer_of(module) == layer
