"""The package requires what it imports, and build outputs are ignored by git."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DIST = {"sklearn": "scikit-learn"}


def _third_party_imports() -> set[str]:
    found = set()
    for path in (ROOT / "dgref").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names:
                    found.add(DIST.get(top, top))
    return found


def _dependencies() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1)
    return {re.split(r"[<>=!~ \[]", d)[0] for d in re.findall(r'"([^"]+)"', block)}


def test_dependencies_are_what_the_package_imports():
    assert _dependencies() == _third_party_imports()


def test_torch_pinned_in_both_places():
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()


def test_build_outputs_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in ("build/", "dist/", "*.egg-info/", "mutants/"):
        assert entry in ignored, entry
