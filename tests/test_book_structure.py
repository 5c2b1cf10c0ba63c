"""The book's sources, checked without executing anything (fast).

Every test discovers the chapters from ``_toc.yml`` and ``book/``; none names a chapter.
"""
from __future__ import annotations

import ast
import re
from collections import Counter

import pytest

from _bookfiles import (BOOK, ROOT, book_sources, cell_tags, labels_in, markdown_text,
                        notebook_figure_names, parameters_cell, parse_parameters,
                        read_notebook, resolve_entry, setup_call, toc_entries, toc_files,
                        toc_notebooks)

NOTEBOOKS = toc_notebooks()
NB_IDS = [p.stem for p in NOTEBOOKS]
PAGES = toc_files()
PAGE_IDS = [p.relative_to(ROOT).as_posix() for p in PAGES]

CITE_RE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
EQ_RE = re.compile(r"\{eq\}`([^`]+)`")
REF_RE = re.compile(r"\{(?:numref|ref)\}`([^`]+)`")
BIB_KEY_RE = re.compile(r"@(\w+)\s*\{\s*([^,\s]+)\s*,")


# --- table of contents ------------------------------------------------------------------

def test_every_toc_entry_exists():
    missing = [e for e in toc_entries() if resolve_entry(e) is None]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def test_toc_has_no_duplicates():
    dup = [e for e, n in Counter(toc_entries()).items() if n > 1]
    assert not dup, f"_toc.yml lists these more than once: {dup}"


def test_every_book_file_is_in_the_toc():
    listed = {p.resolve() for p in toc_files()}
    orphans = [p.relative_to(ROOT).as_posix() for p in book_sources()
               if p.resolve() not in listed]
    assert not orphans, (f"files under book/ missing from _toc.yml (only_build_toc_files "
                         f"would silently drop them): {orphans}")


def test_toc_ends_with_api_and_references():
    entries = [e.rsplit(".", 1)[0] if e.endswith((".md", ".ipynb")) else e
               for e in toc_entries()]
    assert entries[-2:] == ["book/api", "book/references"], entries


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_page_starts_with_a_title(page):
    if page.suffix == ".md":
        first = page.read_text().lstrip().splitlines()[0]
    else:
        cells = read_notebook(page).cells
        assert cells and cells[0].cell_type == "markdown", \
            f"{page.name}: the first cell must be markdown '# Title'"
        first = cells[0].source.lstrip().splitlines()[0]
    assert re.match(r"# \S", first), f"{page.name}: first line must be '# Title', got {first!r}"


# --- chapters (notebooks) ---------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_committed_without_outputs(path):
    dirty = [i for i, c in enumerate(read_notebook(path).cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; commit without outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_declares_python_kernel(path):
    """``papermill book/NAME.ipynb out.ipynb -p seed 3`` (the intro's example) needs the
    notebook's kernelspec: without it papermill stops with "No language found in notebook"."""
    meta = read_notebook(path).metadata
    ks = meta.get("kernelspec", {})
    language = ks.get("language") or meta.get("language_info", {}).get("name")
    if not (ks.get("name") == "python3" and language == "python"):
        pytest.fail(f"{path.name}: notebook metadata lacks kernelspec python3/python (got "
                    f"{dict(ks)}); convert with `jupytext --set-kernel python3 --to ipynb -o "
                    f"{path.relative_to(ROOT)} ...`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_parameters_convention(path):
    """Cell 2 is tagged ``parameters`` (seed=0, device="auto", quick=True, sizes None) and the
    cell right after it calls ``dgref.book.setup_chapter("<file stem>", ...)`` with every size."""
    nb = read_notebook(path)
    i, cell = parameters_cell(nb)
    assert i is not None, f"{path.name}: no code cell tagged 'parameters' (papermill needs it)"
    assert i == 1, f"{path.name}: the parameters cell is cell {i}, expected the second cell (1)"
    params = parse_parameters(cell.source)
    assert params.get("seed") == 0 and params.get("device") == "auto" \
        and params.get("quick") is True, \
        f"{path.name}: parameters cell must set seed = 0, device = 'auto', quick = True; " \
        f"got {params}"
    j, sizes = setup_call(nb)
    assert j == i + 1, f"{path.name}: setup_chapter must be called in the cell right after " \
                       f"the parameters cell (cell {i + 1}), found in cell {j}"
    call = ast.parse(nb.cells[j].source)
    names = [n.args[0].value for n in ast.walk(call) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", getattr(n.func, "id", None)) == "setup_chapter"
             and n.args and isinstance(n.args[0], ast.Constant)]
    assert names == [path.stem], \
        f"{path.name}: setup_chapter's first argument must be {path.stem!r}, got {names}"
    sizes_params = {spec[0] for spec in sizes.values()}
    undeclared = sorted(p for p in sizes_params if p is not None and p not in params)
    assert not undeclared, f"{path.name}: sizes use {undeclared}, not set in the parameters cell"
    not_none = sorted(p for p in sizes_params if p in params and params[p] is not None)
    assert not not_none, f"{path.name}: size parameters {not_none} must default to None " \
                         "(None = the quick/full default)"


# A cell draws a figure if it calls one of these on ``plt`` (outside a function definition).
_FIGURE_CALLS = {"subplots", "figure", "subplot_mosaic", "show", "plot", "imshow", "scatter",
                 "hist", "contour", "contourf", "pcolormesh"}


def _draws_at_top_level(source: str) -> bool:
    try:
        tree = ast.parse("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln
                                   for ln in source.splitlines()))
    except SyntaxError:
        return "plt." in source
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for n in ast.walk(stmt):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "plt"
                    and n.func.attr in _FIGURE_CALLS):
                return True
    return False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_figure_cells_have_captions(path):
    """Plotting cells carry ``mystnb.figure`` caption and name metadata (the papermill test
    checks the same on the cells that actually produced an image)."""
    problems = []
    for i, cell in enumerate(read_notebook(path).cells):
        if cell.cell_type != "code":
            continue
        fig = cell.get("metadata", {}).get("mystnb", {}).get("figure")
        draws = _draws_at_top_level(cell.source)
        if fig is not None:
            if not (isinstance(fig, dict) and str(fig.get("caption", "")).strip()
                    and str(fig.get("name", "")).strip()):
                problems.append(f"cell {i}: mystnb.figure needs a caption and a name, got {fig}")
        elif draws:
            problems.append(f"cell {i}: draws a figure but has no mystnb.figure caption")
        if draws and "hide-input" not in cell_tags(cell):
            problems.append(f"cell {i}: plotting cell not tagged hide-input")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_figure_names_unique_and_prefixed():
    names = [n for p in PAGES for n in notebook_figure_names(p)]
    dup = [n for n, c in Counter(names).items() if c > 1]
    assert not dup, f"figure names used twice: {dup}"
    bad = [n for n in names if not n.startswith("fig-")]
    assert not bad, f"figure names should start with 'fig-': {bad}"


# --- equations and cross-references -------------------------------------------------------

def _all_labels():
    labels = []
    for p in PAGES:
        labels += labels_in(markdown_text(p)) + notebook_figure_names(p)
    return labels


def test_labels_unique_across_book():
    dup = [n for n, c in Counter(_all_labels()).items() if c > 1]
    assert not dup, f"labels defined more than once (prefix them with the chapter name): {dup}"


def test_equation_references_resolve():
    labels = set(_all_labels())
    bad = [(p.name, ref) for p in PAGES for ref in EQ_RE.findall(markdown_text(p))
           if ref not in labels]
    assert not bad, f"{{eq}} references without a labelled equation: {bad}"


def test_labelled_equations_use_the_math_directive_or_dollarmath():
    """Numbered equations are labelled, never referred to as "equation (3)" of the book."""
    bad = []
    for p in PAGES:
        text = markdown_text(p)
        for m in re.finditer(r"\\(?:tag|label)\{([^}]*)\}", text):
            bad.append((p.name, m.group(0)))
    assert not bad, ("use ':label: name' on a {math} block and {eq}`name`, not LaTeX "
                     f"\\label/\\tag: {bad}")


def test_cross_references_resolve():
    labels = set(_all_labels())
    bad = []
    for p in PAGES:
        for ref in REF_RE.findall(markdown_text(p)):
            target = ref.rsplit("<", 1)[-1].rstrip(">").strip()
            if target not in labels:
                bad.append((p.name, target))
    assert not bad, f"{{ref}}/{{numref}} targets not defined in the book: {bad}"


# --- bibliography -----------------------------------------------------------------------

def _bib_keys():
    return [k for _, k in BIB_KEY_RE.findall((BOOK / "references.bib").read_text())]


def test_bibliography_files_exist():
    assert (BOOK / "references.bib").is_file()
    text = (BOOK / "references.md").read_text()
    assert "{bibliography}" in text, "book/references.md must contain a {bibliography} block"


def test_bib_keys_unique():
    dup = [k for k, c in Counter(_bib_keys()).items() if c > 1]
    assert not dup, f"references.bib defines these keys twice: {dup}"


def test_every_cited_key_is_in_the_bib():
    keys = set(_bib_keys())
    missing = []
    for p in book_sources():
        for group in CITE_RE.findall(markdown_text(p)):
            for key in group.split(","):
                if key.strip() and key.strip() not in keys:
                    missing.append((p.relative_to(ROOT).as_posix(), key.strip()))
    assert not missing, f"{{cite}} keys missing from book/references.bib: {missing}"


def test_bib_entries_have_author_title_year():
    text = (BOOK / "references.bib").read_text()
    starts = [m.start() for m in BIB_KEY_RE.finditer(text)] + [len(text)]
    bad = []
    for a, b in zip(starts, starts[1:]):
        entry = text[a:b]
        key = BIB_KEY_RE.match(entry).group(2)
        for field in ("author", "title", "year"):
            if not re.search(rf"^\s*{field}\s*=", entry, re.M | re.I):
                bad.append((key, field))
    assert not bad, f"bib entries missing fields: {bad}"
