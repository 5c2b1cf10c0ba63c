"""What the book is made of, discovered from ``_toc.yml`` (shared by the book tests).

Nothing here names a chapter: every test that uses it works for whatever ``_toc.yml`` lists.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
TOC = ROOT / "_toc.yml"
PARAMETERS_PREFIX = "dgref-parameters:"


def toc_entries(toc_path: Path = TOC) -> list[str]:
    """Every ``file``/``root`` entry of a Jupyter Book 1 ``_toc.yml``, in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    out.append(node[key])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return out


def resolve_entry(entry: str, root: Path = ROOT) -> Path | None:
    """The file a toc entry names (Jupyter Book allows leaving the suffix off), or None."""
    p = root / entry
    if p.suffix in (".md", ".ipynb") and p.is_file():
        return p
    for suffix in (".ipynb", ".md"):
        q = p.with_name(p.name + suffix)
        if q.is_file():
            return q
    return None


def toc_files(root: Path = ROOT) -> list[Path]:
    """The existing files of the toc, in reading order."""
    files = [resolve_entry(e, root) for e in toc_entries(root / "_toc.yml")]
    return [f for f in files if f is not None]


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The executable chapters: the toc's ``.ipynb`` files."""
    return [f for f in toc_files(root) if f.suffix == ".ipynb"]


def book_sources() -> list[Path]:
    """Every ``.md`` and ``.ipynb`` file under ``book/`` (listed in the toc or not)."""
    return sorted(p for p in BOOK.rglob("*") if p.suffix in (".md", ".ipynb")
                  and ".ipynb_checkpoints" not in p.parts and p.is_file())


def read_notebook(path: Path):
    return nbformat.read(path, as_version=4)


def cell_tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def markdown_text(path: Path) -> str:
    """All the MyST text of a page: the file itself, or a notebook's markdown cells."""
    if path.suffix == ".md":
        return path.read_text()
    nb = read_notebook(path)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def parameters_cell(nb):
    """``(index, cell)`` of the cell tagged ``parameters``, or ``(None, None)``."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell_tags(cell):
            return i, cell
    return None, None


def _strip_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def parse_parameters(source: str) -> dict:
    """``{name: value}`` for every ``name = <literal>`` of a parameters cell.

    A right-hand side that is not a literal is recorded as the ``...`` (Ellipsis) object.
    """
    out = {}
    for node in ast.parse(_strip_magics(source)).body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    out[t.id] = ast.literal_eval(value)
                except ValueError:
                    out[t.id] = ...
    return out


def setup_call(nb):
    """``(index, sizes)`` for the first code cell calling ``setup_chapter``.

    ``sizes`` maps a size name to ``(parameter_name, quick_default, full_default)`` as written
    in the call's ``sizes={...}`` (defaults that are not literals come back as ``...``); it is
    ``{}`` when the call has no literal ``sizes`` dict. ``(None, {})`` when no cell calls it.
    """
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "setup_chapter" not in cell.source:
            continue
        sizes = {}
        try:
            tree = ast.parse(_strip_magics(cell.source))
        except SyntaxError:
            return i, sizes
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr",
                                                           getattr(node.func, "id", None))
                    == "setup_chapter"):
                continue
            for kw in node.keywords:
                if kw.arg == "sizes" and isinstance(kw.value, ast.Dict):
                    for k, v in zip(kw.value.keys, kw.value.values):
                        if not (isinstance(k, ast.Constant) and isinstance(v, ast.Tuple)
                                and len(v.elts) == 3):
                            continue
                        par = v.elts[0].id if isinstance(v.elts[0], ast.Name) else None
                        defaults = []
                        for e in v.elts[1:]:
                            try:
                                defaults.append(ast.literal_eval(e))
                            except ValueError:
                                defaults.append(...)
                        sizes[k.value] = (par, *defaults)
        return i, sizes
    return None, {}


def printed_parameters(nb) -> list[dict]:
    """Every ``dgref-parameters: {json}`` record printed by an executed notebook."""
    import json
    records = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                text = out.get("text", "")
                for line in text.splitlines():
                    if line.startswith(PARAMETERS_PREFIX):
                        records.append(json.loads(line[len(PARAMETERS_PREFIX):]))
    return records


_LABEL_RES = [
    re.compile(r"^:label:\s*(\S+)\s*$", re.M),          # {math} directive option
    re.compile(r"^:name:\s*(\S+)\s*$", re.M),           # figure/admonition/code names
    re.compile(r"^\(([A-Za-z0-9_.:-]+)\)=\s*$", re.M),  # MyST target
    re.compile(r"\$\$\s*\(([A-Za-z0-9_.:-]+)\)", re.M),  # dollarmath $$ ... $$ (label)
]


def labels_in(text: str) -> list[str]:
    out = []
    for rx in _LABEL_RES:
        out += rx.findall(text)
    return out


def notebook_figure_names(path: Path) -> list[str]:
    """Names given to figures via ``mystnb.figure.name`` cell metadata."""
    if path.suffix != ".ipynb":
        return []
    names = []
    for cell in read_notebook(path).cells:
        fig = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
        if isinstance(fig, dict) and fig.get("name"):
            names.append(fig["name"])
    return names
