"""The API reference page (book/api.md, autodoc) covers the package, and docstrings name the book.

* every name in ``dgref.__all__`` is documented on book/api.md by an autodoc directive and has
  a docstring of its own;
* every public function's docstring names what it implements ("book", "eq." or "Algorithm");
* every ``eq. NAME`` / ``Algorithm NAME`` a docstring cites is a label defined in the book;
* every autodoc directive on the page names an object that exists.
"""
from __future__ import annotations

import importlib
import inspect
import re

import pytest

import dgref
from _bookfiles import BOOK, labels_in, markdown_text, notebook_figure_names, toc_files

API = (BOOK / "api.md").read_text()
DIRECTIVE_RE = re.compile(r"^\.\.\s+auto(?:function|class|exception|data|method|module|"
                          r"attribute)::\s+([\w.]+)\s*$", re.M)
DOCUMENTED = DIRECTIVE_RE.findall(API)
NAMES = sorted(dgref.__all__)
# "book eq. kl-identity", "eq. edm-precond", "Algorithm edm-sampler": a label, not a number.
CITED_LABEL_RE = re.compile(r"(?:\beq\.|\bAlgorithm)\s+([A-Za-z][\w-]*-[\w-]+)")


def _obj(name):
    return getattr(dgref, name)


@pytest.mark.parametrize("name", NAMES)
def test_public_name_on_api_page(name):
    hits = [d for d in DOCUMENTED if d == f"dgref.{name}" or d.endswith(f".{name}")]
    if not hits:
        pytest.fail(f"dgref.{name} is exported but not documented on book/api.md: add "
                    f"'.. autofunction:: dgref.{name}' (autoclass, autodata) under your "
                    "module's heading")


@pytest.mark.parametrize("name", NAMES)
def test_public_name_has_docstring(name):
    doc = _obj(name).__doc__   # its own, not inherited (inspect.getdoc would inherit)
    assert doc and doc.strip(), f"dgref.{name} has no docstring"


FUNCTIONS = [n for n in NAMES if inspect.isfunction(_obj(n))]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_docstring_names_what_it_implements(name):
    doc = _obj(name).__doc__ or ""
    if not re.search(r"\bbook\b|\beq\.|\bAlgorithm\b", doc):
        pytest.fail(f"dgref.{name}'s docstring does not say which book equation/algorithm it "
                    f"implements (mention 'book', 'eq.' or 'Algorithm'): "
                    f"{doc.strip().splitlines()[:1]}")


def _book_labels():
    labels = set()
    for p in toc_files():
        labels |= set(labels_in(markdown_text(p))) | set(notebook_figure_names(p))
    return labels


def _cited_labels():
    """{label: [where]} for labels cited in docstrings of dgref's public objects and modules."""
    cited = {}
    seen = set()
    objs = [(f"dgref.{n}", _obj(n)) for n in NAMES]
    for n in NAMES:
        o = _obj(n)
        if inspect.isclass(o):
            objs += [(f"dgref.{n}.{m}", v) for m, v in vars(o).items()
                     if not m.startswith("_") and callable(v)]
    mods = {getattr(o, "__module__", None) for _, o in objs} - {None}
    objs += [(m, importlib.import_module(m)) for m in sorted(mods) if m.startswith("dgref")]
    for where, o in objs:
        doc = getattr(o, "__doc__", None) or ""
        if id(o) in seen:
            continue
        seen.add(id(o))
        for label in CITED_LABEL_RE.findall(doc):
            cited.setdefault(label.rstrip(".,;:)"), []).append(where)
    return cited


def test_docstring_equation_labels_exist_in_book():
    labels = _book_labels()
    missing = {k: v for k, v in sorted(_cited_labels().items()) if k not in labels}
    assert not missing, ("docstrings cite equation/algorithm labels that no page of the book "
                         f"defines (label: cited by): {missing}")


@pytest.mark.parametrize("target", DOCUMENTED)
def test_api_page_directive_resolves(target):
    parts = target.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[:i + 1]))
    assert obj is not None


def _rst_problems(doc: str) -> str:
    """Docutils warnings for a docstring as autodoc + napoleon would render it."""
    import io

    from docutils import nodes
    from docutils.core import publish_doctree
    from docutils.parsers.rst import roles
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    def literal_role(name, rawtext, text, lineno, inliner, options=None, content=None):
        return [nodes.literal(rawtext, text)], []

    for role in ("func", "class", "meth", "attr", "mod", "data", "exc", "obj", "eq", "cite",
                 "ref", "numref", "doc", "py:func", "py:class", "py:meth", "py:mod"):
        roles.register_local_role(role, literal_role)
    rst = str(GoogleDocstring(inspect.cleandoc(doc), Config(napoleon_use_param=True)))
    stream = io.StringIO()
    publish_doctree(rst, settings_overrides={"report_level": 2, "halt_level": 5,
                                             "warning_stream": stream})
    return stream.getvalue()


DOCUMENTED_OBJECTS = []
for _n in NAMES:
    _o = _obj(_n)
    if inspect.isfunction(_o) or inspect.isclass(_o):
        DOCUMENTED_OBJECTS.append((_n, _o))
        if inspect.isclass(_o):
            DOCUMENTED_OBJECTS += [(f"{_n}.{m}", v) for m, v in vars(_o).items()
                                   if not m.startswith("_") and inspect.isfunction(v)]


@pytest.mark.parametrize("name,obj", DOCUMENTED_OBJECTS, ids=[n for n, _ in DOCUMENTED_OBJECTS])
def test_docstring_is_valid_rst(name, obj):
    """``jupyter-book build -W`` fails on any docutils warning in a docstring shown on book/api.md
    (e.g. a bare ``|x|`` is read as a substitution: write ````|x|```` instead)."""
    problems = _rst_problems(obj.__doc__ or "")
    if problems:
        pytest.fail(f"dgref.{name}: docstring would break the book build (-W):\n{problems}")
