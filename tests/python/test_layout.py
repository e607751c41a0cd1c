"""The layout rules of STYLE.md and the README's layout section, checked on the tree.

The import layering itself is checked by import-linter (`lint-imports`, contracts in
pyproject.toml, run by tools/dev.sh test)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "deepalign_fast"
#: Private names that may cross modules: the compiled core module and the version string.
ALLOWED = {"_core", "__version__"}


def _python_files() -> list[Path]:
    trees = [PACKAGE, ROOT / "tests", ROOT / "benchmarks", ROOT / "export", ROOT / "tools"]
    return sorted(p for t in trees if t.is_dir() for p in t.rglob("*.py"))


def test_no_private_names_cross_modules() -> None:
    """`from module import _name` only ever names the compiled core: every helper used by
    another module (or a test) is public."""
    if not PACKAGE.is_dir():
        pytest.skip("source tree not present")
    offences = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if not (node.level or mod.startswith("deepalign_fast")):
                    continue  # other packages' own business
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name not in ALLOWED:
                        offences.append(f"{path.relative_to(ROOT)}:{node.lineno} imports "
                                        f"{alias.name} from {'.' * node.level}{mod}")
    assert offences == []


def test_tests_mirror_the_package() -> None:
    """Every test folder under tests/python names a package folder (or benchmarks/export)."""
    tests = ROOT / "tests" / "python"
    if not PACKAGE.is_dir():
        pytest.skip("source tree not present")
    for folder in tests.iterdir():
        if folder.is_dir() and folder.name not in ("__pycache__", "oracles"):
            assert (PACKAGE / folder.name).is_dir() or (ROOT / folder.name).is_dir(), folder


def test_readme_layout_matches_the_tree() -> None:
    """The README's layout section names every subpackage and every top-level module."""
    readme = ROOT / "README.md"
    if not readme.is_file() or not PACKAGE.is_dir():
        pytest.skip("source tree not present")
    text = readme.read_text()
    section = text[text.index("Layout:"):]
    section = section[:section.index("\n## ")]
    names = {p.name + "/" for p in PACKAGE.iterdir()
             if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.name for p in PACKAGE.glob("*.py")
              if not p.name.startswith("_") and p.name != "__init__.py"}
    missing = sorted(n for n in names if not re.search(rf"`{re.escape(n)}`", section))
    assert missing == []
