"""The public API: ``flcore`` exports what plugin and runtime authors use, and the plugins in
this repository use nothing else."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import flcore
from tests.conftest import ROOT

PLUGIN_PACKAGES = sorted(ROOT.glob("plugins/*/flcore_*"))


def flcore_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, what)`` for each import of flcore in ``path`` that is not a public name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "flcore":
                bad += [(node.lineno, a.name) for a in node.names if a.name not in flcore.__all__]
            elif node.module.startswith("flcore."):
                bad.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            bad += [(node.lineno, a.name) for a in node.names if a.name.startswith("flcore.")]
    return bad


def test_the_repository_has_plugins_to_check() -> None:
    assert len(PLUGIN_PACKAGES) >= 4


@pytest.mark.parametrize("package", PLUGIN_PACKAGES, ids=lambda p: p.parent.name)
def test_plugins_import_only_what_flcore_exports(package: Path) -> None:
    found = {
        f"{path.relative_to(ROOT)}:{line}": what
        for path in sorted(package.rglob("*.py"))
        for line, what in flcore_imports(path)
    }
    assert found == {}


def test_the_check_catches_a_private_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from flcore.chain import Chain\nfrom flcore import codec, hookimpl\n")
    assert flcore_imports(sample) == [(1, "flcore.chain"), (2, "codec")]


@pytest.mark.parametrize("name", flcore.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(flcore, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Chain'"):
        importlib.import_module("flcore").Chain  # noqa: B018
