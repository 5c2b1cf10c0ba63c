"""Every chapter of ``_toc.yml`` runs to the end, and its outputs are fit for the book.

Each chapter is executed once per CI run. When ``make book`` has just executed it (its run
in ``_build/.jupyter_cache``, which the pages were rendered from, is the current chapter run
against the current package: ``_bookfiles.reusable_book_run``), the tests read that run.
Otherwise (``make test`` without ``make book``, or anything changed since) they execute the
chapter here, once, the way the book does (``_bookfiles.execute_notebook``: nbclient via
jupyter-cache, the chapter's directory as working directory, ``raises-exception`` and
``skip-execution`` tags honoured), after papermill has injected ``seed``, ``device="cpu"``,
``quick=True`` and every declared size at its quick default, so the run computes what the
book computes while taking the "value given" path of every parameter. With
``DGREF_TEST_SEED=7 make test`` every chapter runs here at seed 7 instead (the book's runs
are not reused): a check that the chapters' claims do not hold only at the default seed.

Per chapter, on that one executed notebook:

* ``test_chapter_runs``: every code cell ran, in order, and none raised (what
  ``nbval --nbval-lax`` checked);
* ``test_chapter_outputs``: every cell that produced an image carries a ``mystnb.figure``
  caption, one image per cell; every captioned cell drew its image; no progress bar or
  warning leaked into the outputs (they would be printed in the book);
* ``test_chapter_prints_its_parameters``: exactly one ``dgref-parameters: {json}`` line,
  naming the chapter, with the values the run was given.

Papermill's own path (values injected, a bad value stopped in the set-up cell) is checked in
test_papermill.py on the chapters' first cells only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from _bookfiles import (cell_tags, code_sources, execute_notebook, execute_settings,
                        parameters_cell, parse_parameters, printed_parameters,
                        quick_parameters, read_notebook, reusable_book_run, setup_call,
                        toc_notebooks)

NOTEBOOKS = toc_notebooks()
TEST_SEED = os.environ.get("DGREF_TEST_SEED")
PROGRESS_RE = re.compile(r"\d+%\|.*\|")   # a tqdm bar
WARNING_RE = re.compile(r"\w*Warning\b")    # e.g. "UserWarning: ..." on stderr


class Run:
    """One executed chapter: ``nb`` (up to the failing cell if it failed), where it came
    from, its parameters (``None`` for the book's run, which used the chapter's own defaults)
    and the failure's traceback (``None`` if it ran to the end)."""

    def __init__(self, nb, origin, params=None, error=None):
        self.nb, self.origin, self.params, self.error = nb, origin, params, error


_RUNS: dict[Path, Run] = {}


def _execute(path: Path, params: dict, kernel: str) -> Run:
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    # papermill's reader (it gives every cell a tags list, which parameterize expects)
    nb = parameterize_notebook(load_notebook_node(str(path)), params, kernel_name=kernel,
                               language="python")
    seconds, error = execute_notebook(nb, path.parent, kernel_name=kernel,
                                      **execute_settings())
    print(f"{path.name}: executed here in {seconds:.1f} s with {params}")
    return Run(nb, "executed here", params, error=error)


def chapter_run(path: Path, kernel: str) -> Run:
    """The chapter's one run in this session: the book's, if reusable, else executed here."""
    if path not in _RUNS:
        why = f"DGREF_TEST_SEED={TEST_SEED} asks for a run here"
        if TEST_SEED is None:
            nb, why = reusable_book_run(path)
            if nb is not None:
                _RUNS[path] = Run(nb, "executed by make book")
                return _RUNS[path]
        print(f"{path.name}: executing here ({why})")
        _RUNS[path] = _execute(path, quick_parameters(path, int(TEST_SEED or 0)), kernel)
    return _RUNS[path]


def _chapters():
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow,
                                              pytest.mark.xdist_group(f"chapter-{p.stem}")])
            for p in NOTEBOOKS]


def _ran(path, kernel_name) -> Run:
    run = chapter_run(path, kernel_name)
    print(f"{path.name}: {run.origin}")
    return run


@pytest.mark.parametrize("path", _chapters())
def test_chapter_runs(path, kernel_name):
    run = _ran(path, kernel_name)
    assert run.error is None, f"{path.name} failed ({run.origin}):\n{run.error}"
    nb, source = run.nb, read_notebook(path)
    assert code_sources(nb) == code_sources(source), \
        f"{path.name}: the executed notebook's code is not the chapter's"
    counts, problems = [], []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        tags = cell_tags(cell)
        if "skip-execution" in tags:
            continue
        if not isinstance(cell.get("execution_count"), int):
            problems.append(f"cell {i} did not run")
        else:
            counts.append(cell.execution_count)
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error" and "raises-exception" not in tags:
                problems.append(f"cell {i} raised {o.get('ename')}: {o.get('evalue')}")
    assert not problems, f"{path.name} ({run.origin}):\n" + "\n".join(problems)
    assert counts == sorted(set(counts)), \
        f"{path.name}: cells ran out of order or twice (execution counts {counts})"


@pytest.mark.parametrize("path", _chapters())
def test_chapter_outputs(path, kernel_name):
    run = _ran(path, kernel_name)
    if run.error is not None:
        pytest.fail(f"{path.name} did not run to the end; see test_chapter_runs")
    problems = []
    for i, cell in enumerate(run.nb.cells):
        if cell.cell_type != "code":
            continue
        images = [o for o in cell.get("outputs", []) if o.get("output_type") in
                  ("display_data", "execute_result") and any(
                      k.startswith("image/") for k in o.get("data", {}))]
        fig = cell.get("metadata", {}).get("mystnb", {}).get("figure")
        if images and not (isinstance(fig, dict) and str(fig.get("caption", "")).strip()):
            problems.append(f"cell {i} draws a figure without a mystnb.figure caption")
        if len(images) > 1:
            problems.append(f"cell {i} draws {len(images)} figures (one per cell)")
        if fig is not None and not images:
            problems.append(f"cell {i} has a figure caption but drew no image (plt.show() "
                            "under a non-inline backend, or the figure closed before display?)")
        for o in cell.get("outputs", []):
            if o.get("output_type") != "stream":
                continue
            if PROGRESS_RE.search(o.get("text", "")):
                problems.append(f"cell {i} printed a progress bar (set progress off)")
            elif o.get("name") == "stderr" and WARNING_RE.search(o.get("text", "")):
                problems.append(f"cell {i} printed a warning into the book: "
                                f"{o['text'].strip()[:300]}")
    assert not problems, f"{path.name} ({run.origin}):\n" + "\n".join(problems)


@pytest.mark.parametrize("path", _chapters())
def test_chapter_prints_its_parameters(path, kernel_name):
    run = _ran(path, kernel_name)
    if run.error is not None and not printed_parameters(run.nb):
        pytest.fail(f"{path.name} did not run; see test_chapter_runs")
    records = printed_parameters(run.nb)
    assert len(records) == 1, (f"{path.name}: expected exactly one 'dgref-parameters:' line "
                               f"(the set-up cell), got {len(records)}")
    rec = records[0]
    assert rec.get("chapter") == path.stem, f"{path.name}: the record names {rec.get('chapter')!r}"
    if run.params is not None:       # executed here: the injected values reached the chapter
        expected = run.params
        for key, value in expected.items():
            assert key in rec, f"{path.name}: parameter {key!r} missing from {rec}"
            assert rec[key] == value and type(rec[key]) is type(value), \
                f"{path.name}: injected {key}={value!r} but the chapter used {rec[key]!r}"
    else:                            # the book's run: the parameters cell's own defaults
        _, cell = parameters_cell(read_notebook(path))
        declared = parse_parameters(cell.source) if cell is not None else {}
        for key in ("seed", "quick"):
            if key in declared:
                assert rec.get(key) == declared[key], \
                    f"{path.name}: the book ran with {key}={rec.get(key)!r}, the chapter " \
                    f"declares {declared[key]!r}"
        sizes = {n for n, (par, *_d) in setup_call(read_notebook(path))[1].items()
                 if par in declared}
        missing = sorted(sizes - rec.keys())
        assert not missing, f"{path.name}: sizes {missing} missing from {rec}"


# --- When the book's run may stand in for a run here (fast; a fake checkout in tmp_path) ---

def _fake_checkout(root: Path):
    """A checkout with one chapter, as `make book` leaves it: the record, and the chapter's
    run in the jupyter-cache (made up here: no kernel)."""
    import json

    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    from _bookfiles import book_inputs
    (root / "dgref").mkdir()
    (root / "dgref" / "core.py").write_text("X = 1\n")
    (root / "book").mkdir()
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/ch\n")
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3"}}
    nb = new_notebook(cells=[new_markdown_cell("# Ch"), new_code_cell("print(1)")], metadata=meta)
    chapter = root / "book" / "ch.ipynb"
    nbformat.write(nb, chapter)
    (root / "_build").mkdir()
    record = book_inputs(root)
    (root / "_build" / "book-inputs.json").write_text(json.dumps(record))
    nb.cells[1].execution_count = 1
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="1\n")]
    cache = get_cache(str(root / "_build" / ".jupyter_cache"))
    cache.cache_notebook_bundle(CacheBundleIn(nb, str(chapter)), check_validity=False)
    return chapter, record


def test_book_run_is_reused_only_when_current(tmp_path):
    import json

    import nbformat
    chapter, record = _fake_checkout(tmp_path)
    nb, why = reusable_book_run(chapter, root=tmp_path)
    assert nb is not None and why is None, why
    assert nb.cells[1].outputs[0].text == "1\n" and nb.cells[0].source == "# Ch"

    def edit(path, old, new):
        text = path.read_text()
        path.write_text(text.replace(old, new))
        return lambda: path.write_text(text)

    undo = edit(tmp_path / "dgref" / "core.py", "X = 1", "X = 2")       # the package changed
    assert reusable_book_run(chapter, root=tmp_path) == (None, (
        "dgref, benchmarks, _config.yml, _toc.yml, requirements.txt changed since `make book`"))
    undo()
    (tmp_path / "dgref" / "new.py").write_text("")                       # a file added
    assert reusable_book_run(chapter, root=tmp_path)[0] is None
    (tmp_path / "dgref" / "new.py").unlink()
    undo = edit(chapter, "print(1)", "print(2)")                          # the chapter changed
    assert "book/ch.ipynb changed" in reusable_book_run(chapter, root=tmp_path)[1]
    undo()
    nb = nbformat.read(chapter, as_version=4)                             # a tag changed
    nb.cells[1].metadata["tags"] = ["raises-exception"]
    nbformat.write(nb, chapter)
    assert reusable_book_run(chapter, root=tmp_path)[0] is None
    nb.cells[1].metadata.pop("tags")
    nbformat.write(nb, chapter)
    assert reusable_book_run(chapter, root=tmp_path)[0] is not None
    rec = tmp_path / "_build" / "book-inputs.json"                        # an earlier build's
    rec.write_text(json.dumps({**record, "started": record["started"] + 3600}))
    assert "older than the last" in reusable_book_run(chapter, root=tmp_path)[1]
    rec.write_text(json.dumps({**record, "chapters": {"book/ch.ipynb": "0" * 64}}))
    assert "book/ch.ipynb changed" in reusable_book_run(chapter, root=tmp_path)[1]
    rec.write_text(json.dumps(record))
    cache_db = tmp_path / "_build" / ".jupyter_cache" / "global.db"       # no cached run
    cache_db.rename(cache_db.with_suffix(".old"))
    assert ".jupyter_cache missing" in reusable_book_run(chapter, root=tmp_path)[1]
    cache_db.with_suffix(".old").rename(cache_db)
    from jupyter_cache import get_cache
    cache = get_cache(str(cache_db.parent))                               # the run is gone
    for entry in cache.list_cache_records():
        cache.remove_cache(entry.pk)
    assert "holds no run of book/ch.ipynb" in reusable_book_run(chapter, root=tmp_path)[1]
    rec.unlink()                                                          # build did not pass
    assert "no completed `make book`" in reusable_book_run(chapter, root=tmp_path)[1]


def test_make_book_executes_chapters_into_the_cache_and_leaves_out_failures(tmp_path, capsys):
    """`make book`'s parallel step: a chapter that ran is cached so that the build renders it
    without running it again; one that failed is not (the build runs it again and reports
    it), and the generated config points the build at the cache."""
    import nbformat
    import yaml
    from jupyter_cache import get_cache
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from _bookfiles import execute_book
    (tmp_path / "book").mkdir()
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    for name, code in [("good", "x = 6 * 7\nprint(x)"), ("bad", "assert 1 == 2, 'claim broken'")]:
        nbformat.write(new_notebook(cells=[new_markdown_cell(f"# {name}"), new_code_cell(code)],
                                    metadata=meta), tmp_path / "book" / f"{name}.ipynb")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/good\nchapters:\n"
                                       "  - file: book/bad\n")
    (tmp_path / "_config.yml").write_text("title: t\nexecute:\n  execute_notebooks: force\n"
                                          "  timeout: 60\nsphinx:\n  local_extensions:\n"
                                          "    style: book/_ext\n")
    cache_dir, config = tmp_path / "_build" / ".jupyter_cache", tmp_path / "_build" / "c.yml"
    assert execute_book(cache_dir, config, workers=2, root=tmp_path) == 1
    out = capsys.readouterr().out
    assert "book/bad.ipynb FAILED" in out and "claim broken" in out, out
    cache = get_cache(str(cache_dir))
    good = cache.match_cache_notebook(read_notebook(tmp_path / "book" / "good.ipynb"))
    assert cache.get_cache_bundle(good.pk).nb.cells[0].outputs[0].text == "42\n"
    with pytest.raises(KeyError):
        cache.match_cache_notebook(read_notebook(tmp_path / "book" / "bad.ipynb"))
    cfg = yaml.safe_load(config.read_text())
    assert cfg["title"] == "t" and cfg["execute"] == {
        "execute_notebooks": "cache", "timeout": 60, "cache": str(cache_dir.resolve())}
    # jupyter-book puts local extensions on sys.path relative to the config file
    assert cfg["sphinx"]["local_extensions"] == {"style": str((tmp_path / "book/_ext").resolve())}


def test_a_kernel_that_did_not_start_is_started_again(monkeypatch, capsys):
    """A kernel that dies before answering kernel_info (another process took one of its
    ports: ZMQError 'Address already in use', seen on a busy machine) ran no cell, so the
    run is started again; a cell's failure is reported at once, never retried."""
    import jupyter_cache.executors.utils as jcu
    from nbformat.v4 import new_code_cell, new_notebook

    import _bookfiles
    calls, fail_next = [], [True]
    real = jcu.single_nb_execution

    def flaky(nb, **kw):
        calls.append(1)
        if fail_next.pop() if fail_next else False:
            raise RuntimeError("Kernel died before replying to kernel_info")
        return real(nb, **kw)

    monkeypatch.setattr(jcu, "single_nb_execution", flaky)
    nb = new_notebook(cells=[new_code_cell("print(6 * 7)")])
    seconds, error = _bookfiles.execute_notebook(nb, Path.cwd(), timeout=60)
    assert error is None and len(calls) == 2 and nb.cells[0].outputs[0].text == "42\n"
    assert "did not start (attempt 1)" in capsys.readouterr().out

    calls.clear()
    nb = new_notebook(cells=[new_code_cell("assert 1 == 2, 'claim broken'")])
    seconds, error = _bookfiles.execute_notebook(nb, Path.cwd(), timeout=60)
    assert "claim broken" in error and len(calls) == 1          # a cell failed: no retry

    def never(nb, **kw):
        calls.append(1)
        raise RuntimeError("Kernel died before replying to kernel_info")

    calls.clear()
    monkeypatch.setattr(jcu, "single_nb_execution", never)
    seconds, error = _bookfiles.execute_notebook(nb, Path.cwd(), timeout=60)
    assert _bookfiles.kernel_start_failed(error)
    assert len(calls) == 1 + _bookfiles.KERNEL_START_RETRIES   # bounded, then reported
