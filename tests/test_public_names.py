"""Code outside the library uses only its public names.

``lint-imports`` (pyproject.toml, the ``private_modules`` contract) checks the packages ``bilevel`` and
``bilevel_studies``; the example scripts and the benchmarks are not packages, so this test reads their
source: no ``bilevel._x`` / ``bilevel.x._y`` module and no private name (``from bilevel.x import _y``,
``bilevel.x._y``) of the library. The tests themselves import no private module either (they may still
reach a private helper of a public module, to test it).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _private(dotted: str) -> bool:
    """Whether a dotted name below ``bilevel`` has a private part (``_x``, not a dunder such as ``__version__``)."""
    parts = dotted.split(".")
    return parts[0] == "bilevel" and any(p.startswith("_") and not p.endswith("__") for p in parts[1:])


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def private_uses(path: Path, names: bool = True) -> list[str]:
    """``file:line: name`` for each private module (and, with ``names``, private name) of ``bilevel`` used."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        used: list[str] = []
        if isinstance(node, ast.Import):
            used = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            members = [f"{node.module}.{a.name}" for a in node.names]
            # without ``names``: only the members that are modules (``from bilevel import _tree``)
            used = [node.module] + (members if names else [m for m in members if _is_module(m)])
        elif names and isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            used = [dotted] if dotted else []
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        found += [f"{where}:{node.lineno}: {u}" for u in used if _private(u)]
    return sorted(set(found))


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["examples", "benchmarks"])
def test_examples_and_benchmarks_use_only_public_names(folder):
    files = _files(folder)
    assert files, f"no Python files under {folder}/"
    bad = [line for f in files for line in private_uses(f)]
    assert bad == [], "private names of bilevel used (make them public or use the public API):\n" + "\n".join(bad)


def test_tests_import_no_private_module():
    bad = [line for f in _files("tests") for line in private_uses(f, names=False)]
    assert bad == [], "\n".join(bad)


def test_the_check_finds_private_modules_and_names(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import bilevel\nfrom bilevel import tree, _tree\nfrom bilevel.data._split import standardise\n"
        "from bilevel.hypergradient import _Compiled\nx = bilevel.solvers._cg\ny = bilevel.__version__\n"
    )
    names = [line.split(": ", 1)[1] for line in private_uses(probe)]
    modules = [line.split(": ", 1)[1] for line in private_uses(probe, names=False)]
    assert names == sorted(
        {
            "bilevel._tree",
            "bilevel.data._split",
            "bilevel.data._split.standardise",
            "bilevel.hypergradient._Compiled",
            "bilevel.solvers._cg",
        }
    )
    assert modules == ["bilevel.data._split"]  # bilevel._tree is gone: no module to find
